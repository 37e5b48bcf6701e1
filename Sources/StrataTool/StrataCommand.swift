import Strata
@main struct Main { static func main() {} }
