import ArgumentParser
import Strata

#if canImport(Glibc)
import Glibc
#endif

/// `strata check [-f qcow2] [-r leaks|all] [--output human|json] [-q] [-U] FILE`: qemu-img
/// check's categories, counts, output and exit codes (0 clean, 1 check not completed,
/// 2 corruptions, 3 leaks only; after `-r`, the state after the repair).
struct Check: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check a qcow2 image's refcounts and tables, and repair them.",
        discussion: """
            Exit status: 0 no errors, 1 the check could not complete, 2 corruptions, \
            3 leaked clusters only, 63 the format has no checks (raw). With -r, the status describes the image after the repair. \
            -r all also turns entries that point past the end of the file, are unaligned or \
            point into metadata into zero clusters, and names the guest ranges lost.
            """)

    @OptionGroup var format: FormatOption
    @OptionGroup var output: OutputOption
    @OptionGroup var quietOption: QuietOption
    @OptionGroup var share: ForceShareOption

    @Option(name: .customShort("r"), help: ArgumentHelp("Repair: leaks (free leaked clusters) or all.", valueName: "leaks|all"))
    var repair: String?

    @Argument(help: "The image file.")
    var file: String

    func validate() throws {
        if let r = repair, CheckRepair(rawValue: r) == nil {
            throw ValidationError("invalid -r value '\(r)': expected leaks or all")
        }
        if repair != nil && share.forceShare {
            throw ValidationError("-U (force share) cannot be used with -r: a repair needs the image to itself")
        }
    }

    func run() throws {
        if format.format == .raw { try Self.unsupported(file) }
        let mode = repair.flatMap(CheckRepair.init(rawValue:))
        let quiet = quietOption.quiet
        let result: CheckResult
        do {
            result = try Qcow2Image.check(path: file, repair: mode, forceShare: share.forceShare) { line in
                flushStdout()
                fputs(line + "\n", stderr)
            }
        } catch let e as StrataError {
            if case .notQcow2 = e { try Self.unsupported(file) }
            throw e
        }
        if output.output == .human && !quiet && (result.corruptionsFixed > 0 || result.leaksFixed > 0) {
            print("""
                The following inconsistencies were found and repaired:

                    \(result.leaksFixed) leaked clusters
                    \(result.corruptionsFixed) corruptions

                Double checking the fixed image now...
                """)
        }
        if result.checkErrors > 0 && result.corruptionsFixed == 0 && result.leaksFixed == 0 {
            printError("strata: Check failed")
            throw ExitCode(1)
        }
        if !quiet {
            switch output.output {
            case .human: print(Self.human(result), terminator: "")
            case .json: print(Self.json(result, filename: file).pretty)
            }
        }
        if result.checkErrors > 0 { printError("strata: Check failed") }
        let code = result.exitCode
        if code != 0 { throw ExitCode(code) }
    }

    /// Raw images have nothing to check: qemu-img's exit code 63.
    static func unsupported(_ file: String) throws -> Never {
        printError("strata: \(file): this image format does not support checks")
        throw ExitCode(63)
    }

    /// qemu-img's human report.
    static func human(_ r: CheckResult) -> String {
        var out = ""
        if r.corruptions == 0 && r.leaks == 0 && r.checkErrors == 0 {
            out += "No errors were found on the image.\n"
        } else {
            if r.corruptions > 0 {
                out += "\n\(r.corruptions) errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n"
            }
            if r.leaks > 0 {
                out += "\n\(r.leaks) leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n"
            }
            if r.checkErrors > 0 {
                out += "\n\(r.checkErrors) internal errors have occurred during the check.\n"
            }
        }
        if r.totalClusters != 0 && r.allocatedClusters != 0 {
            let a = Double(r.allocatedClusters)
            out += "\(r.allocatedClusters)/\(r.totalClusters) = \(percent(a * 100 / Double(r.totalClusters)))% allocated, "
                + "\(percent(Double(r.fragmentedClusters) * 100 / a))% fragmented, "
                + "\(percent(Double(r.compressedClusters) * 100 / a))% compressed clusters\n"
        }
        if r.imageEndOffset != 0 { out += "Image end offset: \(r.imageEndOffset)\n" }
        out += marks(r)
        return out
    }

    /// Strata's own lines, after qemu-img's report (none for an image without Strata's marks).
    static func marks(_ r: CheckResult) -> String {
        var out = ""
        if let t = r.template {
            out += t.sealed ? "Template: sealed (not written since it was made a template)\n"
                : "Template: NOT sealed: written after it was made a template; linked clones made before may read changed data\n"
            if t.writableMode {
                out += t.modeFixed ? "Template: file mode made read-only (0444)\n"
                    : "Template: the file mode allows writing (chmod a-w, or strata check -r leaks)\n"
            }
        }
        if let d = r.dedupIndex {
            if let why = d.unusable {
                out += "Dedup index: not used (\(why)); 'strata dedup' rebuilds it\n"
            } else {
                out += "Dedup index: \(d.records) records\(d.complete ? ", complete" : "")"
                if d.checked {
                    out += d.staleRecordsDropped > 0 ? ", \(d.staleRecordsDropped) stale records removed" : ", \(d.staleRecords) stale"
                } else {
                    out += ", records not checked (the image is corrupt)"
                }
                out += "\n"
            }
        }
        return out
    }

    /// `%0.2f`.
    static func percent(_ v: Double) -> String {
        let hundredths = Int((v * 100).rounded())
        let frac = hundredths % 100
        return "\(hundredths / 100).\(frac < 10 ? "0" : "")\(frac)"
    }

    /// qemu-img's JSON report (QAPI `ImageCheck`), fields in qemu-img's order, optional
    /// ones only when non-zero.
    static func json(_ r: CheckResult, filename: String) -> JSONValue {
        var fields: [(String, JSONValue)] = []
        func optional(_ key: String, _ v: UInt64) { if v != 0 { fields.append((key, .uint(v))) } }
        optional("image-end-offset", r.imageEndOffset)
        optional("compressed-clusters", r.compressedClusters)
        optional("total-clusters", r.totalClusters)
        optional("corruptions", UInt64(r.corruptions))
        optional("corruptions-fixed", UInt64(r.corruptionsFixed))
        fields.append(("check-errors", .uint(UInt64(r.checkErrors))))
        optional("leaks", UInt64(r.leaks))
        optional("leaks-fixed", UInt64(r.leaksFixed))
        optional("allocated-clusters", r.allocatedClusters)
        fields.append(("filename", .string(filename)))
        fields.append(("format", .string("qcow2")))
        optional("fragmented-clusters", r.fragmentedClusters)
        // Strata's own (absent for images without its marks, so qemu-img's shape is kept).
        if let t = r.template {
            var o: [(String, JSONValue)] = [("sealed", .bool(t.sealed)), ("writable-mode", .bool(t.writableMode))]
            if t.modeFixed { o.append(("mode-fixed", .bool(true))) }
            fields.append(("template", .object(o)))
        }
        if let d = r.dedupIndex {
            var o: [(String, JSONValue)] = [("filename", .string(d.path))]
            if let why = d.unusable {
                o.append(("unusable", .string(why)))
            } else {
                o += [("records", .uint(UInt64(d.records))), ("complete", .bool(d.complete)), ("checked", .bool(d.checked))]
                if d.checked { o.append(("stale-records", .uint(UInt64(d.staleRecords)))) }
                if d.staleRecordsDropped > 0 { o.append(("stale-records-dropped", .uint(UInt64(d.staleRecordsDropped)))) }
            }
            fields.append(("dedup-index", .object(o)))
        }
        return .object(fields)
    }
}
