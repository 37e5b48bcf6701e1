import ArgumentParser
import StrataNBD

/// The control socket of a running `strata serve --control PATH`.
struct ServerOption: ParsableArguments {
    @Option(help: ArgumentHelp("The server's control socket (strata serve --control PATH).", valueName: "path"))
    var server: String
}

/// `strata export list|add|remove --server PATH …`: change what a running server exports,
/// without restarting it (qemu-storage-daemon's `block-export-add` / `block-export-del`).
struct ExportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export",
        abstract: "List, add and remove the exports of a running server (through its control socket).",
        subcommands: [List.self, Add.self, Remove.self])

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the exports served now.")
        @OptionGroup var server: ServerOption
        @Option(name: .customLong("output"), help: ArgumentHelp("human (default) or json.", valueName: "fmt"))
        var output = "human"

        func validate() throws {
            guard output == "human" || output == "json" else { throw ValidationError("--output must be human or json") }
        }

        func run() throws {
            let reply = try ControlClient.execute(server: server.server, "query-exports")
            if output == "json" {
                print(reply.text)
                return
            }
            for e in reply.arrayValue ?? [] {
                var line = e["name"]?.stringValue ?? "?"
                if let file = e["file"]?.stringValue { line += "\t" + file }
                if let snap = e["snapshot"]?.stringValue { line += " (snapshot '\(snap)')" }
                line += "\t" + (e["format"]?.stringValue ?? "?")
                line += "\t" + (e["size"]?.intValue.map { HumanFormat.size(UInt64(clamping: $0)) } ?? "?")
                line += e["read-only"]?.boolValue == true ? "\tread-only" : "\twritable"
                line += "\t\(e["clients"]?.intValue ?? 0) client(s)"
                print(line)
            }
        }
    }

    struct Add: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Serve an image under a new export name.",
            discussion: "FILE is made absolute here. With --snapshot, the export serves that internal snapshot's state, read-only.")
        @OptionGroup var server: ServerOption
        @Option(name: [.customShort("f"), .long], help: ArgumentHelp("Image format (qcow2 or raw); probed when omitted.", valueName: "fmt"))
        var format: String?
        @Flag(name: [.customShort("r"), .long], help: "Export read-only.")
        var readOnly = false
        @Option(name: [.customShort("l"), .long], help: ArgumentHelp("Serve this internal snapshot (id or name), read-only.", valueName: "name"))
        var snapshot: String?
        @Argument(help: "The export name.") var name: String
        @Argument(help: "The image file.") var file: String

        func run() throws {
            var args: [(String, ControlJSON)] = [("name", .string(name)), ("file", .string(ControlClient.absolute(file)))]
            if let format { args.append(("format", .string(format))) }
            if readOnly { args.append(("read-only", .bool(true))) }
            if let snapshot { args.append(("snapshot", .string(snapshot))) }
            _ = try ControlClient.execute(server: server.server, "block-export-add", args)
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Stop serving an export: its clients finish their requests in flight and are disconnected.")
        @OptionGroup var server: ServerOption
        @Argument(help: "The export name.") var name: String

        func run() throws {
            _ = try ControlClient.execute(server: server.server, "block-export-del", [("name", .string(name))])
        }
    }
}
