import XCTest
@testable import Strata

final class Qcow2SmokeTests: XCTestCase {
    func testCreateWriteReadMemory() throws {
        let mem = MemoryStorage(name: "mem.qcow2")
        var o = CreateOptions(size: 8 << 20)
        o.clusterSize = 4096
        try Qcow2Image.create(storage: mem, path: "mem.qcow2", options: o)
        let img = try Qcow2Image(storage: mem, options: OpenOptions(writable: true))
        let data = [UInt8](repeating: 0xab, count: 10000)
        try data.withUnsafeBytes { try img.write($0, at: 1234, fua: false) }
        var back = [UInt8](repeating: 0, count: 12000)
        try back.withUnsafeMutableBytes { try img.read(into: $0, at: 1000) }
        XCTAssertEqual(Array(back[0..<234]), [UInt8](repeating: 0, count: 234))
        XCTAssertEqual(Array(back[234..<10234]), data)
        XCTAssertEqual(Array(back[10234...]), [UInt8](repeating: 0, count: 12000 - 10234))
        try img.close()
        let again = try Qcow2Image(storage: mem, options: OpenOptions(writable: false))
        var back2 = [UInt8](repeating: 0, count: 12000)
        try back2.withUnsafeMutableBytes { try again.read(into: $0, at: 1000) }
        XCTAssertEqual(back, back2)
    }
}
