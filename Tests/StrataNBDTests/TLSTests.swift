#if canImport(Glibc)
import Glibc
#endif
import Foundation
import NIOCore
import XCTest

@testable import StrataNBD

/// A throwaway x509 PKI made with openssl for one test: a CA, a server certificate for
/// `localhost`, and client folders in the layout libnbd and QEMU read (`ca-cert.pem`,
/// `client-cert.pem`, `client-key.pem`).
struct TestPKI {
    let dir: String
    var caCert: String { dir + "/ca-cert.pem" }
    var serverCert: String { dir + "/server-cert.pem" }
    var serverKey: String { dir + "/server-key.pem" }
    /// A client with a certificate the CA signed.
    var client: String { dir + "/client" }
    /// A client that trusts the CA but has no certificate of its own.
    var noCert: String { dir + "/nocert" }
    /// A client whose certificate another CA signed.
    var rogue: String { dir + "/rogue" }

    /// Makes the PKI under `parent/pki` (RSA 2048, valid two days).
    static func make(in parent: String) throws -> TestPKI {
        let pki = TestPKI(dir: parent + "/pki")
        let fm = FileManager.default
        for d in [pki.dir, pki.client, pki.noCert, pki.rogue] { try fm.createDirectory(atPath: d, withIntermediateDirectories: true) }
        let openssl = try Peer.path("openssl")
        func run(_ args: [String]) throws {
            let r = try Peer.run(openssl, args)
            guard r.status == 0 else {
                XCTFail("openssl \(args.joined(separator: " ")):\n\(r.transcript)")
                throw Peer.PeerMissing(name: "openssl")
            }
        }
        func makeCA(_ prefix: String, _ name: String) throws {
            try run(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=\(name)",
                     "-keyout", "\(prefix)-key.pem", "-out", "\(prefix)-cert.pem",
                     "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        }
        func issue(_ prefix: String, cn: String, ca: String, extensions: String) throws {
            let ext = "\(prefix).ext"
            try extensions.write(toFile: ext, atomically: true, encoding: .utf8)
            try run(["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=\(cn)", "-keyout", "\(prefix)-key.pem",
                     "-out", "\(prefix).csr"])
            try run(["x509", "-req", "-in", "\(prefix).csr", "-CA", "\(ca)-cert.pem", "-CAkey", "\(ca)-key.pem",
                     "-CAcreateserial", "-CAserial", "\(ca).srl", "-days", "2", "-extfile", ext, "-out", "\(prefix)-cert.pem"])
        }
        let d = pki.dir
        try makeCA("\(d)/ca", "Strata Test CA")
        try makeCA("\(d)/other-ca", "Some Other CA")
        try issue("\(d)/server", cn: "localhost", ca: "\(d)/ca", extensions: """
            basicConstraints=CA:FALSE
            keyUsage=digitalSignature,keyEncipherment
            extendedKeyUsage=serverAuth
            subjectAltName=DNS:localhost,IP:127.0.0.1
            """)
        let clientExt = """
            basicConstraints=CA:FALSE
            keyUsage=digitalSignature,keyEncipherment
            extendedKeyUsage=clientAuth
            """
        try issue("\(d)/client", cn: "strata-test-client", ca: "\(d)/ca", extensions: clientExt)
        try issue("\(d)/rogue", cn: "strata-test-rogue", ca: "\(d)/other-ca", extensions: clientExt)
        for folder in [pki.client, pki.noCert, pki.rogue] { try fm.copyItem(atPath: pki.caCert, toPath: folder + "/ca-cert.pem") }
        for (from, folder) in [("client", pki.client), ("rogue", pki.rogue)] {
            try fm.copyItem(atPath: "\(d)/\(from)-cert.pem", toPath: folder + "/client-cert.pem")
            try fm.copyItem(atPath: "\(d)/\(from)-key.pem", toPath: folder + "/client-key.pem")
        }
        return pki
    }

    /// The server's TLS settings.
    func configuration(mode: NBDTLSMode = .require, verifyClients: Bool = false) throws -> NBDTLSConfiguration {
        try NBDTLSConfiguration(certificate: serverCert, key: serverKey, clientCA: verifyClients ? caCert : nil, mode: mode)
    }
}

/// The STARTTLS rules as the protocol's FORCEDTLS and SELECTIVETLS sections state them, first
/// on the state machine, then against real clients: a raw-socket script, libnbd's nbdinfo and
/// nbdcopy, and qemu-img's x509 credentials; plus the `serve` flags and the control socket's mode.
final class TLSTests: XCTestCase {
    private let M = 1 << 20

    // MARK: State machine

    private let disk = Export(name: "disk", device: FakeDevice(size: 1 << 20))

    private func machine(_ tls: NBDTLSMode?) -> HandshakeStateMachine {
        var m = HandshakeStateMachine(registry: ExportRegistry([disk]), tls: tls)
        XCTAssertEqual(m.receive(.clientFlags(1)), .none)
        return m
    }

    /// `NBD_OPT_GO` / `NBD_OPT_INFO` data for "disk" with no information requests.
    private var goData: ByteBuffer {
        var b = ByteBuffer()
        b.writeInteger(UInt32(4))   // name length
        b.writeString("disk")       // name
        b.writeInteger(UInt16(0))   // number of information requests
        return b
    }

    private func replyTypes(_ action: HandshakeStateMachine.Action) -> [NBDOptionReplyType] {
        guard case .send(let replies) = action else { return [] }
        return replies.map(\.type)
    }

    func testRequiredTLSRefusesEveryOptionButStartTLSAndAbort() {
        var m = machine(.require)
        for (code, data) in [(NBDOptionCode.list, ByteBuffer()), (.info, goData), (.go, goData),
                             (.structuredReply, ByteBuffer()), (NBDOptionCode(rawValue: 99), ByteBuffer())] {
            XCTAssertEqual(replyTypes(m.receive(.option(code, data))), [.errTLSRequired], "\(code) before TLS")
        }
        XCTAssertFalse(m.isFinished, "refusals keep the connection")
        XCTAssertEqual(m.receive(.option(.abort, ByteBuffer())), .sendAndClose([.ack(.abort)]))

        m = machine(.require)
        XCTAssertEqual(m.receive(.option(.exportName, ByteBuffer(string: "disk"))), .close(.tlsRequired),
                       "EXPORT_NAME cannot carry an error, so the connection closes")

        m = machine(.require)
        XCTAssertEqual(m.receive(.option(.startTLS, ByteBuffer())), .startTLS(.ack(.startTLS)))
        XCTAssertTrue(m.tlsStarted)
        guard case .enterTransmission = m.receive(.option(.go, goData)) else { return XCTFail("GO inside TLS") }
    }

    func testStartTLSIsAckedOnceAndForgetsStructuredReplies() {
        var m = machine(.optional)
        XCTAssertEqual(replyTypes(m.receive(.option(.structuredReply, ByteBuffer()))), [.ack])
        XCTAssertEqual(replyTypes(m.receive(.option(.startTLS, ByteBuffer(bytes: [0])))), [.errInvalid], "STARTTLS takes no data")
        XCTAssertEqual(m.receive(.option(.startTLS, ByteBuffer())), .startTLS(.ack(.startTLS)))
        XCTAssertEqual(replyTypes(m.receive(.option(.startTLS, ByteBuffer()))), [.errInvalid], "TLS is already on")
        guard case .enterTransmission(let session, _) = m.receive(.option(.go, goData)) else { return XCTFail("GO") }
        XCTAssertFalse(session.structuredReplies, "structured replies negotiated before STARTTLS are forgotten")
    }

    func testOptionalTLSServesPlainTextAndNoCredentialsMeansPolicyRefusal() {
        var m = machine(.optional)
        XCTAssertEqual(replyTypes(m.receive(.option(.list, ByteBuffer()))), [.server, .ack])
        guard case .enterTransmission = m.receive(.option(.go, goData)) else { return XCTFail("plain GO") }
        m = machine(.optional)
        guard case .enterTransmissionAfterExportName = m.receive(.option(.exportName, ByteBuffer(string: "disk"))) else {
            return XCTFail("plain EXPORT_NAME")
        }
        m = machine(nil)
        XCTAssertEqual(replyTypes(m.receive(.option(.startTLS, ByteBuffer()))), [.errPolicy])
        XCTAssertEqual(replyTypes(m.receive(.option(.list, ByteBuffer()))), [.server, .ack], "no TLS_REQD without TLS")
    }

    // MARK: Real clients

    private func server(_ dir: String, _ pki: TestPKI, mode: NBDTLSMode = .require, verifyClients: Bool = false,
                        size: String = "16M") throws -> TestServer {
        try makeQcow2("\(dir)/disk.qcow2", size: size)
        let tls = try pki.configuration(mode: mode, verifyClients: verifyClients)
        return try TestServer(dir: dir, exports: [TestExport(name: "disk", path: "\(dir)/disk.qcow2")]) { $0.tls = tls }
    }

    /// `nbds+unix:///disk?socket=S&tls-certificates=DIR`.
    private func tlsURI(_ server: TestServer, certificates: String) -> String {
        "nbds+unix:///disk?socket=\(server.socket)&tls-certificates=\(certificates)"
    }

    func testRawClientStartTLSWhenRequired() throws {
        let dir = try makeTempDir(self)
        let pki = try TestPKI.make(in: dir)
        let server = try self.server(dir, pki)
        try Peer.python("tls_options.py", [server.socket, "disk", "require", pki.client])
    }

    func testRawClientStartTLSWhenOptional() throws {
        let dir = try makeTempDir(self)
        let pki = try TestPKI.make(in: dir)
        let server = try self.server(dir, pki, mode: .optional)
        try Peer.python("tls_options.py", [server.socket, "disk", "optional", pki.client])
    }

    func testLibnbdReadsAndWritesByteExactOverMutualTLS() throws {
        let dir = try makeTempDir(self)
        let pki = try TestPKI.make(in: dir)
        let server = try self.server(dir, pki, verifyClients: true)
        let uri = tlsURI(server, certificates: pki.client)
        let info = try Peer.expectSuccess("nbdinfo", [uri])
        XCTAssertTrue(info.out.contains("newstyle-fixed with TLS"), "nbdinfo reports TLS:\n\(info.out)")
        XCTAssertTrue(info.out.contains("\(16 * M)"), info.out)

        let random = try XCTUnwrap(FileHandle(forReadingAtPath: "/dev/urandom"))
        let bytes = random.readData(ofLength: 6 * M)
        try random.close()
        try bytes.write(to: URL(fileURLWithPath: "\(dir)/in.bin"))
        try Peer.expectSuccess("nbdcopy", ["\(dir)/in.bin", uri])
        try Peer.expectSuccess("nbdcopy", [uri, "\(dir)/out.bin"])
        let back = try Data(contentsOf: URL(fileURLWithPath: "\(dir)/out.bin"))
        XCTAssertEqual(back.count, 16 * M)
        XCTAssertTrue(back.prefix(6 * M).elementsEqual(bytes), "what nbdcopy wrote over TLS reads back byte-exact")
        XCTAssertTrue(back.dropFirst(6 * M).allSatisfy { $0 == 0 }, "the rest stays zero")
        try server.stop()
        try Peer.expectSuccess("qemu-img", ["check", "\(dir)/disk.qcow2"])
    }

    func testQemuImgInfoConvertAndCompareOverTLS() throws {
        let dir = try makeTempDir(self)
        let pki = try TestPKI.make(in: dir)
        let server = try self.server(dir, pki, verifyClients: true, size: "8M")
        try makeRaw("\(dir)/src.raw", size: 8 * M)
        try Peer.expectSuccess("qemu-io", ["-f", "raw", "\(dir)/src.raw", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0xa5 5M 512k"])
        let object = "tls-creds-x509,id=tls0,dir=\(pki.client),endpoint=client"
        // Over a Unix socket qemu has no host name to check the server's certificate against
        // ("No hostname for certificate validation"): tls-hostname gives it one.
        let nbd = "driver=nbd,server.type=unix,server.path=\(server.socket),export=disk,tls-creds=tls0,tls-hostname=localhost"
        let info = try Peer.expectSuccess("qemu-img", ["info", "--object", object, "--image-opts", nbd])
        XCTAssertTrue(info.out.contains("virtual size: 8 MiB"), info.out)
        try Peer.expectSuccess("qemu-img", ["convert", "-n", "--object", object, "-f", "raw", "\(dir)/src.raw",
                                            "--target-image-opts", nbd])
        try Peer.expectSuccess("qemu-img", ["compare", "--object", object, "--image-opts",
                                            "driver=raw,file.driver=file,file.filename=\(dir)/src.raw", nbd])
        // And the same bytes are in the image itself.
        try server.stop()
        try Peer.expectSuccess("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", "\(dir)/src.raw", "\(dir)/disk.qcow2"])
    }

    func testPlainClientIsRefusedWhenTLSIsRequiredAndServedWhenOptional() throws {
        let dir = try makeTempDir(self)
        let pki = try TestPKI.make(in: dir)
        var server = try self.server(dir, pki)
        let nbdinfo = try Peer.path("nbdinfo")
        // libnbd 1.14 reports NBD_REP_ERR_TLS_REQD as ENOTSUP ("Operation not supported"); its
        // debug log shows the server's reason.
        let plain = try Peer.run(nbdinfo, [server.uri("disk")], environment: ["LIBNBD_DEBUG": "1"])
        XCTAssertNotEqual(plain.status, 0, "a plain-text client is refused:\n\(plain.transcript)")
        XCTAssertTrue(plain.transcript.contains("TLS is required: send NBD_OPT_STARTTLS first"),
                      "the server says TLS is required:\n\(plain.transcript)")
        let qemu = try Peer.run(try Peer.path("qemu-img"), ["info", "-f", "raw", server.uri("disk")])
        XCTAssertNotEqual(qemu.status, 0, qemu.transcript)
        XCTAssertTrue(qemu.err.contains("TLS negotiation required") && qemu.err.contains("TLS is required: send NBD_OPT_STARTTLS first"),
                      "qemu-img says TLS is required, with the server's reason:\n\(qemu.err)")
        try server.stop()
        try FileManager.default.removeItem(atPath: "\(dir)/disk.qcow2")

        server = try self.server(dir, pki, mode: .optional)
        let optional = try Peer.expectSuccess("nbdinfo", [server.uri("disk")])
        XCTAssertTrue(optional.out.contains("without TLS"), optional.out)
        let upgraded = try Peer.expectSuccess("nbdinfo", [tlsURI(server, certificates: pki.noCert)])
        XCTAssertTrue(upgraded.out.contains("with TLS"), "a TLS client on the same server gets TLS:\n\(upgraded.out)")
    }

    /// The in-flight caps still stop reading when requests arrive through TLS: with the image
    /// stalled, 1000 encrypted 16 KiB writes are not swallowed (the plain-text bound of
    /// BackpressureTests, plus TLS record overhead).
    func testInFlightCapsStopReadingInsideTLS() throws {
        let dir = try makeTempDir(self)
        let pki = try TestPKI.make(in: dir)
        let device = FakeDevice(size: 8 << 20)
        device.closeGate()
        let tls = try pki.configuration()
        let server = try TestServer(dir: dir, registry: ExportRegistry([Export(name: "gated", device: device)])) { $0.tls = tls }
        let (count, size) = (1000, 16 << 10)
        let client = try Spawned(try Peer.path("python3"),
                                 Peer.scriptArguments("tls_backpressure.py", [server.socket, "gated", "\(count)", "\(size)", pki.client]),
                                 stderrPath: "\(dir)/client.log")
        let accepted = client.waitForLines(1).first.flatMap { Int($0.split(separator: " ").last ?? "") }
        device.openGate()
        client.send("go")
        XCTAssertEqual(client.waitForExit(timeout: 60), 0, "\(client.lines)\n\(client.stderr)")
        let got = try XCTUnwrap(accepted, "no 'accepted' line: \(client.lines) \(client.stderr)")
        XCTAssertLessThan(got, 6 << 20, "the server kept reading while \(count) writes were stalled (\(got) bytes taken)")
        XCTAssertTrue(client.lines.contains("replied \(count)"), "\(client.lines)")
        print("TLS backpressure: \(got) of about \(count * (size + 28)) bytes taken while stalled")
        try server.stop()
    }

    /// A client that sends STARTTLS and then stalls the TLS handshake is dropped by the
    /// handshake time limit, like one that stalls option haggling.
    func testAStalledTLSHandshakeIsDroppedByTheHandshakeTimeLimit() throws {
        let dir = try makeTempDir(self)
        let pki = try TestPKI.make(in: dir)
        try makeRaw("\(dir)/d.raw", size: 1 << 20)
        let tls = try pki.configuration()
        let server = try TestServer(dir: dir, exports: [TestExport(name: "disk", path: "\(dir)/d.raw")]) {
            $0.tls = tls
            $0.handshakeTimeout = .milliseconds(500)
        }
        let script = """
            import socket, struct, sys, time
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(sys.argv[1])
            def exactly(n):
                b = b""
                while len(b) < n:
                    d = s.recv(n - len(b))
                    if not d: sys.exit("closed early")
                    b += d
                return b
            exactly(18)                                                          # greeting
            s.sendall(struct.pack(">I", 1) + struct.pack(">QII", 0x49484156454F5054, 5, 0))  # flags, STARTTLS
            assert struct.unpack(">QIII", exactly(20))[2] == 1                    # ACK
            start = time.time()
            while s.recv(65536): pass                                             # no ClientHello: wait
            print(f"closed after {time.time() - start:.1f} s")
            """
        let r = try Peer.run(try Peer.path("python3"), ["-c", script, server.socket], timeout: 30)
        XCTAssertEqual(r.status, 0, r.transcript)
        XCTAssertTrue(r.out.hasPrefix("closed after"), r.transcript)
    }

    func testTLSCAAdmitsOnlyClientsWithACertificateItSigned() throws {
        let dir = try makeTempDir(self)
        let pki = try TestPKI.make(in: dir)
        let server = try self.server(dir, pki, verifyClients: true)
        let nbdinfo = try Peer.path("nbdinfo")
        for (folder, what) in [(pki.noCert, "no client certificate"), (pki.rogue, "a certificate from another CA")] {
            let r = try Peer.run(nbdinfo, [tlsURI(server, certificates: folder)], timeout: 30)
            XCTAssertNotEqual(r.status, 0, "\(what) is refused:\n\(r.transcript)")
        }
        let object = "tls-creds-x509,id=tls0,dir=\(pki.noCert),endpoint=client"
        let qemu = try Peer.run(try Peer.path("qemu-img"), ["info", "--object", object, "--image-opts",
                                                             "driver=nbd,server.type=unix,server.path=\(server.socket),export=disk,tls-creds=tls0,tls-hostname=localhost"],
                                timeout: 30)
        XCTAssertNotEqual(qemu.status, 0, "qemu-img without a client certificate is refused:\n\(qemu.transcript)")
        try Peer.expectSuccess("nbdinfo", [tlsURI(server, certificates: pki.client)])
    }

    // MARK: Credentials, flags, control socket

    func testUnusableCredentialsAreRefusedNamingTheFile() throws {
        let dir = try makeTempDir(self)
        let pki = try TestPKI.make(in: dir)
        XCTAssertThrowsError(try NBDTLSConfiguration(certificate: "\(dir)/missing.pem", key: pki.serverKey)) {
            XCTAssertEqual($0 as? NBDTLSError, .unreadable(option: "--tls-cert", path: "\(dir)/missing.pem", errno: ENOENT))
        }
        XCTAssertThrowsError(try NBDTLSConfiguration(certificate: pki.serverKey, key: pki.serverKey)) {
            XCTAssertTrue("\($0)".contains("--tls-cert: '\(pki.serverKey)' holds no"), "\($0)")
        }
        XCTAssertThrowsError(try NBDTLSConfiguration(certificate: pki.serverCert, key: pki.serverCert)) {
            XCTAssertTrue("\($0)".contains("--tls-key: '\(pki.serverCert)' holds no PEM private key"), "\($0)")
        }
        XCTAssertThrowsError(try NBDTLSConfiguration(certificate: pki.serverCert, key: "\(pki.client)/client-key.pem")) {
            XCTAssertTrue("\($0)".contains("cannot be used together: the key is not the certificate's"), "\($0)")
        }
    }

    /// The `strata` binary built next to this test bundle.
    private func strata() throws -> String {
        let exe = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")
        let path = URL(fileURLWithPath: exe).deletingLastPathComponent().appendingPathComponent("strata").path
        guard FileManager.default.isExecutableFile(atPath: path) else {
            XCTFail("the strata binary is not built at \(path): run 'swift build' first")
            throw Peer.PeerMissing(name: "strata")
        }
        return path
    }

    func testServeTLSFlags() throws {
        let dir = try makeTempDir(self)
        let pki = try TestPKI.make(in: dir)
        try makeQcow2("\(dir)/disk.qcow2", size: "8M")
        let strata = try strata()
        let base = ["serve", "--socket", "\(dir)/nbd.sock", "\(dir)/disk.qcow2"]
        for (args, message) in [
            (["--tls-key", pki.serverKey], "--tls-key needs --tls-cert"),
            (["--tls-ca", pki.caCert], "--tls-ca needs --tls-cert"),
            (["--tls", "require"], "--tls needs --tls-cert"),
            (["--tls-cert", pki.serverCert], "--tls-cert needs --tls-key"),
            (["--tls-cert", pki.serverCert, "--tls-key", pki.serverKey, "--tls", "maybe"], "unknown --tls mode 'maybe'"),
            (["--tls-cert", "\(dir)/nope.pem", "--tls-key", pki.serverKey], "--tls-cert: cannot read '\(dir)/nope.pem'"),
            (["--tls-cert", pki.serverCert, "--tls-key", pki.serverKey, "--tls-ca", "\(dir)/serve.log"],
             "--tls-ca: cannot read '\(dir)/serve.log'"),
            (["--tls-cert", pki.caCert + ".missing", "--tls-key", pki.serverKey], "cannot read"),
            (["--tls-cert", "\(dir)/disk.qcow2", "--tls-key", pki.serverKey], "--tls-cert: '\(dir)/disk.qcow2' holds no"),
            (["--tls-creds", "tls0"], "--tls-cert DIR/server-cert.pem"),
        ] {
            let r = try Peer.run(strata, base + args, timeout: 20)
            XCTAssertNotEqual(r.status, 0, "\(args) is refused")
            XCTAssertTrue(r.err.hasPrefix("strata: ") && r.err.contains(message), "\(args): expected '\(message)' in:\n\(r.err)")
            XCTAssertEqual(r.err.filter { $0 == "\n" }.count, 1, "\(args): one line:\n\(r.err)")
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: "\(dir)/nbd.sock"))

        let served = try Spawned(strata, base + ["--tls-cert", pki.serverCert, "--tls-key", pki.serverKey, "--tls-ca", pki.caCert,
                                                 "--control", "\(dir)/ctl.sock"], stderrPath: "\(dir)/serve.log")
        defer { served.process.terminate(); _ = served.waitForExit() }
        let lines = served.waitForLines(1)
        XCTAssertEqual(lines.first, "nbds+unix:///disk?socket=\(dir)/nbd.sock", "the URI says TLS:\n\(served.stderr)")
        let mode = try FileManager.default.attributesOfItem(atPath: "\(dir)/ctl.sock")[.posixPermissions] as? Int
        XCTAssertEqual(mode, 0o600, "the control socket is the owner's only")
        let info = try Peer.expectSuccess("nbdinfo", ["nbds+unix:///disk?socket=\(dir)/nbd.sock&tls-certificates=\(pki.client)"])
        XCTAssertTrue(info.out.contains("with TLS"), info.out)
        let plain = try Peer.run(try Peer.path("nbdinfo"), ["nbd+unix:///disk?socket=\(dir)/nbd.sock"])
        XCTAssertNotEqual(plain.status, 0, "--tls require is the default:\n\(plain.transcript)")
    }

    func testControlSocketIsOwnerOnlyWhateverTheUmask() throws {
        let dir = try makeTempDir(self)
        let old = umask(0)
        defer { _ = umask(old) }
        let registry = ExportRegistry([Export(name: "disk", device: FakeDevice(size: 1 << 20))])
        let control = ControlServer(path: "\(dir)/ctl.sock",
                                    service: ControlService(registry: registry, defaults: .init(options: .init(writable: true), version: "test"),
                                                            logger: testLogger()),
                                    logger: testLogger())
        try control.start()
        defer { control.stop() }
        _ = umask(old)
        let mode = try FileManager.default.attributesOfItem(atPath: "\(dir)/ctl.sock")[.posixPermissions] as? Int
        XCTAssertEqual(mode, 0o600, "mode 0600 even with umask 0")
        // Anything but a socket at the path is left alone and refused.
        control.stop()
        let plain = "\(dir)/plain"
        FileManager.default.createFile(atPath: plain, contents: Data("x".utf8))
        let other = ControlServer(path: plain, service: ControlService(registry: registry, defaults: .init(options: .init(writable: true), version: "test"),
                                                                     logger: testLogger()),
                                  logger: testLogger())
        XCTAssertThrowsError(try other.start()) { XCTAssertTrue("\($0)".contains("exists and is not a socket"), "\($0)") }
    }
}
