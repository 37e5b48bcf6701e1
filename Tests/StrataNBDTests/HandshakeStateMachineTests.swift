import NIOCore
import XCTest

@testable import StrataNBD

/// The option exchange, message by message, as the protocol document describes it.
final class HandshakeStateMachineTests: XCTestCase {
    private let disk = Export(name: "disk", description: "the disk", device: FakeDevice(size: 1 << 20))
    private let other = Export(name: "other", device: FakeDevice(size: 4096, readOnly: true, preferredBlockSize: 4096))
    private lazy var registry = ExportRegistry([disk, other])

    /// A machine that has received the client flags.
    private func negotiating(flags: UInt32 = 1) -> HandshakeStateMachine {
        var m = HandshakeStateMachine(registry: registry)
        XCTAssertEqual(m.receive(.clientFlags(flags)), .none)
        return m
    }

    /// `NBD_OPT_INFO` / `NBD_OPT_GO` data.
    private func infoData(_ name: String, _ infos: [UInt16] = []) -> ByteBuffer {
        var b = ByteBuffer()
        b.writeInteger(UInt32(name.utf8.count))  // name length
        b.writeString(name)                      // name
        b.writeInteger(UInt16(infos.count))      // number of information requests
        for i in infos { b.writeInteger(i) }     // NBD_INFO_* codes
        return b
    }

    /// `NBD_OPT_*_META_CONTEXT` data.
    private func metaData(_ name: String, _ queries: [String]) -> ByteBuffer {
        var b = ByteBuffer()
        b.writeInteger(UInt32(name.utf8.count))  // export name length
        b.writeString(name)                      // export name
        b.writeInteger(UInt32(queries.count))    // number of queries
        for q in queries {
            b.writeInteger(UInt32(q.utf8.count))  // query length
            b.writeString(q)                      // query
        }
        return b
    }

    func testClientFlagsMustBeKnownAndFixedNewstyle() {
        var m = HandshakeStateMachine(registry: registry)
        XCTAssertEqual(m.receive(.clientFlags(0x4)), .close(.unknownClientFlags(4)))
        m = HandshakeStateMachine(registry: registry)
        XCTAssertEqual(m.receive(.clientFlags(0)), .close(.notFixedNewstyle))
        m = HandshakeStateMachine(registry: registry)
        XCTAssertEqual(m.receive(.clientFlags(3)), .none)  // fixed newstyle + no zeroes
    }

    func testListNamesEveryExportThenAcks() {
        var m = negotiating()
        XCTAssertEqual(m.receive(.option(.list, ByteBuffer())), .send([
            NBDOptionReply(option: .list, type: .server, payload: .server(name: "disk", details: "the disk")),
            NBDOptionReply(option: .list, type: .server, payload: .server(name: "other", details: nil)),
            .ack(.list),
        ]))
        guard case .send(let r) = m.receive(.option(.list, ByteBuffer(bytes: [0]))) else { return XCTFail() }
        XCTAssertEqual(r.map(\.type), [.errInvalid], "LIST with data is invalid")
    }

    func testInfoReportsExportNameDescriptionAndBlockSize() {
        var m = negotiating()
        let action = m.receive(.option(.info, infoData("", [1, 2, 3])))
        let flags = disk.transmissionFlags(structuredReplies: false)
        XCTAssertEqual(action, .send([
            NBDOptionReply(option: .info, type: .info, payload: .exportInfo(size: 1 << 20, flags: flags)),
            NBDOptionReply(option: .info, type: .info, payload: .nameInfo("disk")),  // canonical name of ""
            NBDOptionReply(option: .info, type: .info, payload: .descriptionInfo("the disk")),
            NBDOptionReply(option: .info, type: .info, payload: .blockSizeInfo(minimum: 1, preferred: 65536, maximum: 32 << 20)),
            .ack(.info),
        ]))
        XCTAssertFalse(m.isFinished, "INFO does not end the handshake")
    }

    func testGoUnknownExportAndMalformedGo() {
        var m = negotiating()
        guard case .send(let unknown) = m.receive(.option(.go, infoData("nope"))) else { return XCTFail() }
        XCTAssertEqual(unknown.map(\.type), [.errUnknown])
        var bad = infoData("disk")
        bad.writeInteger(UInt16(7))  // a trailing byte pair not announced in the count
        guard case .send(let invalid) = m.receive(.option(.go, bad)) else { return XCTFail() }
        XCTAssertEqual(invalid.map(\.type), [.errInvalid])
        var lying = ByteBuffer()
        lying.writeInteger(UInt32(100))  // name length larger than the option
        lying.writeString("disk")
        guard case .send(let invalid2) = m.receive(.option(.go, lying)) else { return XCTFail() }
        XCTAssertEqual(invalid2.map(\.type), [.errInvalid])
        // Still negotiating: a correct GO succeeds.
        guard case .enterTransmission(let session, _) = m.receive(.option(.go, infoData("other"))) else { return XCTFail() }
        XCTAssertTrue(session.export === other)
        XCTAssertTrue(session.flags.contains(.readOnly))
        XCTAssertTrue(m.isFinished)
    }

    func testExportNameEntersTransmissionOrCloses() {
        var m = negotiating(flags: 3)
        XCTAssertEqual(m.receive(.option(.exportName, ByteBuffer(string: "disk"))),
                       .enterTransmissionAfterExportName(NBDSession(export: disk, structuredReplies: false, metaContexts: []),
                                                         zeroes: false))
        m = negotiating(flags: 1)
        XCTAssertEqual(m.receive(.option(.exportName, ByteBuffer(string: ""))),
                       .enterTransmissionAfterExportName(NBDSession(export: disk, structuredReplies: false, metaContexts: []),
                                                         zeroes: true))
        m = negotiating()
        XCTAssertEqual(m.receive(.option(.exportName, ByteBuffer(string: "missing"))), .close(.unknownExport("missing")))
    }

    /// Every option asks the registry afresh: exports added or removed in the middle of a
    /// handshake are seen by the next option, and their sizes are the current ones.
    func testOptionsSeeTheCurrentExports() throws {
        let device = FakeDevice(size: 4096)
        let registry = ExportRegistry([Export(name: "a", device: device), Export(name: "b", device: FakeDevice(size: 512))])
        var m = HandshakeStateMachine(registry: registry)
        XCTAssertEqual(m.receive(.clientFlags(1)), .none)
        func listed() -> [String] {
            guard case .send(let replies) = m.receive(.option(.list, ByteBuffer())) else { return [] }
            return replies.compactMap { if case .server(let name, _) = $0.payload { return name } else { return nil } }
        }
        XCTAssertEqual(listed(), ["a", "b"])
        try registry.remove("a")
        try registry.add(Export(name: "c", device: FakeDevice(size: 512)))
        XCTAssertEqual(listed(), ["b", "c"])
        guard case .send(let unknown) = m.receive(.option(.info, infoData("a"))) else { return XCTFail() }
        XCTAssertEqual(unknown.map(\.type), [.errUnknown], "a removed export is unknown")
        guard case .send(let info) = m.receive(.option(.info, infoData("", [1]))) else { return XCTFail() }
        XCTAssertTrue(info.contains { $0.payload == .nameInfo("b") }, "the default is now b: \(info)")
        try registry.add(Export(name: "a", device: device))
        device.size = 8192
        guard case .send(let grown) = m.receive(.option(.info, infoData("a"))) else { return XCTFail() }
        XCTAssertEqual(grown.first?.payload,
                       .exportInfo(size: 8192, flags: registry.lookup("a")!.transmissionFlags(structuredReplies: false)))
    }

    func testStructuredRepliesOnceThenInvalid() {
        var m = negotiating()
        XCTAssertEqual(m.receive(.option(.structuredReply, ByteBuffer())), .send([.ack(.structuredReply)]))
        guard case .send(let again) = m.receive(.option(.structuredReply, ByteBuffer())) else { return XCTFail() }
        XCTAssertEqual(again.map(\.type), [.errInvalid])
        guard case .enterTransmission(let s, let replies) = m.receive(.option(.go, infoData("disk"))) else { return XCTFail() }
        XCTAssertTrue(s.structuredReplies)
        XCTAssertTrue(s.flags.contains(.sendDF), "DF is offered only with structured replies")
        XCTAssertEqual(replies.last, .ack(.go))
    }

    func testStartTLSIsRefusedByPolicyAndUnknownOptionsAreUnsupported() {
        var m = negotiating()
        guard case .send(let tls) = m.receive(.option(.startTLS, ByteBuffer())) else { return XCTFail() }
        XCTAssertEqual(tls.map(\.type), [.errPolicy])
        guard case .send(let unknown) = m.receive(.option(NBDOptionCode(rawValue: 0x77), ByteBuffer(bytes: [1, 2, 3]))) else {
            return XCTFail()
        }
        XCTAssertEqual(unknown.map(\.type), [.errUnsupported])
    }

    func testAbortAcksAndCloses() {
        var m = negotiating()
        XCTAssertEqual(m.receive(.option(.abort, ByteBuffer(bytes: [9]))), .sendAndClose([.ack(.abort)]))
        XCTAssertTrue(m.isFinished)
    }

    func testMetaContextsNeedStructuredReplies() {
        var m = negotiating()
        guard case .send(let r) = m.receive(.option(.setMetaContext, metaData("disk", ["base:allocation"]))) else {
            return XCTFail()
        }
        XCTAssertEqual(r.map(\.type), [.errInvalid])
    }

    func testListMetaContextWildcardsAndSetSelection() {
        var m = negotiating()
        _ = m.receive(.option(.structuredReply, ByteBuffer()))
        // No query: everything, ids zero.
        XCTAssertEqual(m.receive(.option(.listMetaContext, metaData("disk", []))), .send([
            NBDOptionReply(option: .listMetaContext, type: .metaContext, payload: .metaContext(id: 0, name: "base:allocation")),
            NBDOptionReply(option: .listMetaContext, type: .metaContext, payload: .metaContext(id: 0, name: "qemu:allocation-depth")),
            .ack(.listMetaContext),
        ]))
        // A bare namespace lists that namespace; unknown namespaces are ignored.
        XCTAssertEqual(m.receive(.option(.listMetaContext, metaData("disk", ["qemu:", "x-unknown:foo"]))), .send([
            NBDOptionReply(option: .listMetaContext, type: .metaContext, payload: .metaContext(id: 0, name: "qemu:allocation-depth")),
            .ack(.listMetaContext),
        ]))
        // SET ignores "base:" and selects exact names, with real ids.
        XCTAssertEqual(m.receive(.option(.setMetaContext, metaData("disk", ["base:", "base:allocation", "qemu:allocation-depth"]))), .send([
            NBDOptionReply(option: .setMetaContext, type: .metaContext, payload: .metaContext(id: 1, name: "base:allocation")),
            NBDOptionReply(option: .setMetaContext, type: .metaContext, payload: .metaContext(id: 2, name: "qemu:allocation-depth")),
            .ack(.setMetaContext),
        ]))
        guard case .enterTransmission(let s, _) = m.receive(.option(.go, infoData("disk"))) else { return XCTFail() }
        XCTAssertEqual(s.metaContexts, [.baseAllocation, .allocationDepth])
    }

    func testContextsChosenForAnotherExportDoNotCarryOver() {
        var m = negotiating()
        _ = m.receive(.option(.structuredReply, ByteBuffer()))
        _ = m.receive(.option(.setMetaContext, metaData("disk", ["base:allocation"])))
        guard case .enterTransmission(let s, _) = m.receive(.option(.go, infoData("other"))) else { return XCTFail() }
        XCTAssertEqual(s.metaContexts, [])
    }

    func testFailedSetClearsThePreviousSelection() {
        var m = negotiating()
        _ = m.receive(.option(.structuredReply, ByteBuffer()))
        _ = m.receive(.option(.setMetaContext, metaData("disk", ["base:allocation"])))
        guard case .send(let r) = m.receive(.option(.setMetaContext, metaData("missing", ["base:allocation"]))) else {
            return XCTFail()
        }
        XCTAssertEqual(r.map(\.type), [.errUnknown])
        guard case .enterTransmission(let s, _) = m.receive(.option(.go, infoData("disk"))) else { return XCTFail() }
        XCTAssertEqual(s.metaContexts, [])
    }

    func testTooManyQueriesIsTooBigAndMalformedQueriesInvalid() {
        var m = negotiating()
        _ = m.receive(.option(.structuredReply, ByteBuffer()))
        guard case .send(let big) = m.receive(.option(.listMetaContext,
                                                      metaData("disk", Array(repeating: "base:", count: 200)))) else {
            return XCTFail()
        }
        XCTAssertEqual(big.map(\.type), [.errTooBig])
        var bad = metaData("disk", [])
        bad.setInteger(UInt32(1), at: 4 + 4)  // claim one query, send none
        guard case .send(let invalid) = m.receive(.option(.listMetaContext, bad)) else { return XCTFail() }
        XCTAssertEqual(invalid.map(\.type), [.errInvalid])
    }

    func testOptionCountIsCapped() {
        var m = negotiating()
        for _ in 0..<NBDLimits.maxOptionsPerHandshake {
            guard case .send = m.receive(.option(NBDOptionCode(rawValue: 99), ByteBuffer())) else { return XCTFail() }
        }
        XCTAssertEqual(m.receive(.option(.list, ByteBuffer())), .close(.tooManyOptions))
    }
}
