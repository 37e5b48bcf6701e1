import XCTest

@testable import StrataNBD

/// The control socket's JSON codec, on hostile lines: every failure is an error with an
/// offset, never a trap.
final class ControlJSONTests: XCTestCase {
    func testValuesRoundTripWithTheirKeyOrder() throws {
        let text = #"{"z": 1, "a": [true, false, null, -5, 2.5], "s": "tab\there \"q\" \\ \u0001 é 😀"}"#
        let v = try ControlJSON.parse(text)
        XCTAssertEqual(v["z"], .int(1))
        XCTAssertEqual(v["a"], .array([.bool(true), .bool(false), .null, .int(-5), .double(2.5)]))
        XCTAssertEqual(v["s"]?.stringValue, "tab\there \"q\" \\ \u{1} é 😀")
        XCTAssertEqual(v.text, #"{"z": 1, "a": [true, false, null, -5, 2.5], "s": "tab\there \"q\" \\ \u0001 é 😀"}"#)
        XCTAssertEqual(try ControlJSON.parse(v.text), v)
        XCTAssertEqual(try ControlJSON.parse(#""\ud83d\ude00""#).stringValue, "😀", "a surrogate pair")
        XCTAssertEqual(try ControlJSON.parse("  {}\r\n"), .object([]))
        XCTAssertEqual(try ControlJSON.parse("9223372036854775807"), .int(.max))
    }

    func testMalformedLinesAreErrorsWithAnOffset() {
        let cases: [(String, String)] = [
            ("", "unexpected end of input"),
            ("{", "expected a key string"),
            (#"{"a" 1}"#, "expected ':'"),
            (#"{"a": 1,}"#, "expected a key string"),
            (#"{"a": 1} x"#, "unexpected text after the value"),
            (#"{"a": 1, "a": 2}"#, "duplicate key 'a'"),
            (#""abc"#, "unterminated string"),
            ("\"a\u{1}b\"", "control character in a string"),
            (#""\x""#, "invalid escape"),
            (#""\u12""#, #"invalid \u escape"#),
            (#""\ud800x""#, "unpaired surrogate"),
            ("[1 2]", "expected ',' or ']'"),
            ("tru", "unknown literal"),
            ("-", "invalid number"),
            ("1e999", "invalid number"),
            (String(repeating: "[", count: 17) + String(repeating: "]", count: 17), "nested deeper than 16 levels"),
        ]
        for (text, reason) in cases {
            XCTAssertThrowsError(try ControlJSON.parse(text), text) { error in
                XCTAssertEqual((error as? ControlJSON.ParseError)?.reason, reason, text)
            }
        }
        XCTAssertThrowsError(try ControlJSON.parse([0x22, 0xFF, 0x22]), "invalid UTF-8 in a string")
        XCTAssertNoThrow(try ControlJSON.parse(String(repeating: "[", count: 16) + String(repeating: "]", count: 16)))
    }
}
