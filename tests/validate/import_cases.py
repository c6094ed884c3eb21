#!/usr/bin/env python3
"""Imports protovalidate's conformance cases into `cases.json`.

The cases are Go code in protovalidate's repository
(tools/protovalidate-conformance/internal/cases), run by a Go harness that
this machine cannot build. This reads that Go with tree-sitter and writes
each case whose message is a plain literal as data: its suite and name, the
message (Go field names, which the runner maps onto the contract's fields)
and the expected result. Cases built by code rather than literals are
counted as not imported.

    pip install tree_sitter tree_sitter_go
    python3 tests/validate/import_cases.py PROTOVALIDATE_CHECKOUT

It also copies the cases' .proto files into tests/validate/proto.
"""

import ast
import base64
import codecs
import json
import math
import re
import shutil
import sys
from pathlib import Path

import tree_sitter as ts
import tree_sitter_go as tsg

HERE = Path(__file__).parent
PARSER = ts.Parser(ts.Language(tsg.language()))


class Unsupported(Exception):
    pass


WRAPPERS = {
    "String": "StringValue", "Bytes": "BytesValue", "Bool": "BoolValue", "Int32": "Int32Value",
    "Int64": "Int64Value", "UInt32": "UInt32Value", "UInt64": "UInt64Value", "Float": "FloatValue",
    "Double": "DoubleValue",
}
WKT_PACKAGES = {"durationpb", "timestamppb", "wrapperspb", "anypb", "fieldmaskpb", "structpb", "emptypb"}
MATH = {
    "MaxInt32": 2**31 - 1, "MinInt32": -(2**31), "MaxInt64": 2**63 - 1, "MinInt64": -(2**63),
    "MaxUint32": 2**32 - 1, "MaxUint64": 2**64 - 1, "MaxFloat32": 3.4028234663852886e38,
    "MaxFloat64": sys.float_info.max, "SmallestNonzeroFloat32": 1.401298464324817e-45,
    "SmallestNonzeroFloat64": 5e-324,
}


def text(node):
    return node.text.decode()


def go_string(node):
    raw = text(node)
    if raw.startswith("`"):
        return raw[1:-1]
    return ast.literal_eval(raw)


def go_bytes(node):
    r"""A Go string as the bytes it holds: `\xNN` is one byte, other text UTF-8."""
    raw = text(node)
    if raw.startswith("`"):
        return raw[1:-1].encode()
    return codecs.escape_decode(raw[1:-1].encode())[0]


def encoded(data):
    return {"@bytes": base64.b64encode(data).decode()}


def number(value):
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return {"@float": str(value)}
    return value


def type_name(node):
    if node.type == "qualified_type":
        return text(node.child_by_field_name("package")), text(node.child_by_field_name("name"))
    if node.type == "pointer_type":
        return type_name(node.named_children[0])
    raise Unsupported(f"type {node.type}")


def struct(package, name, body):
    if package == "wrapperspb":
        package, name = "google.protobuf", name
    elif package in WKT_PACKAGES:
        package = "google.protobuf"
    fields = {}
    for element in body.named_children:
        if element.type == "comment":
            continue
        if element.type != "keyed_element":
            raise Unsupported("positional struct fields")
        key, value = element.named_children[0], element.named_children[1]
        fields[text(key)] = evaluate(value.named_children[0] if value.type == "literal_element" else value)
    return {"@type": f"{package}.{name}", "fields": fields}


def elements(body, element_type):
    values = []
    for element in body.named_children:
        if element.type == "comment":
            continue
        node = element.named_children[0] if element.type == "literal_element" else element
        if node.type == "literal_value":
            values.append(composite(element_type, node))
        else:
            values.append(evaluate(node))
    return values


def composite(type_node, body):
    kind = type_node.type
    if kind in ("qualified_type", "pointer_type"):
        return struct(*type_name(type_node), body)
    if kind == "slice_type":
        element = type_node.child_by_field_name("element")
        if text(element) == "byte":
            return {"@bytes": base64.b64encode(bytes(elements(body, element))).decode()}
        return elements(body, element)
    if kind == "map_type":
        value_type = type_node.child_by_field_name("value")
        result = []
        for element in body.named_children:
            if element.type == "comment":
                continue
            key = evaluate(element.named_children[0].named_children[0])
            value = element.named_children[1]
            value = value.named_children[0] if value.type == "literal_element" else value
            value = composite(value_type, value) if value.type == "literal_value" else evaluate(value)
            result.append([key, value])
        return {"@map": result}
    raise Unsupported(f"composite of {kind}")


def call(node):
    function = node.child_by_field_name("function")
    arguments = [a for a in node.child_by_field_name("arguments").named_children if a.type != "comment"]
    name = text(function)
    if name.startswith("proto.") or name in ("results.FieldPath",) or name in (
        "float32", "float64", "int32", "int64", "uint32", "uint64", "string"
    ):
        return evaluate(arguments[0])
    if name.startswith("wrapperspb."):
        wrapper = WRAPPERS[name.split(".")[1]]
        return {"@type": f"google.protobuf.{wrapper}", "fields": {"Value": evaluate(arguments[0])}}
    if name == "math.Inf":
        return {"@float": "inf" if evaluate(arguments[0]) >= 0 else "-inf"}
    if name == "math.NaN":
        return {"@float": "nan"}
    if name == "[]byte":
        return encoded(go_bytes(arguments[0]))
    raise Unsupported(f"call {name}")


def evaluate(node):
    kind = node.type
    if kind in ("interpreted_string_literal", "raw_string_literal"):
        return go_string(node)
    if kind == "int_literal":
        return int(text(node).replace("_", ""), 0)
    if kind == "float_literal":
        return float(text(node).replace("_", ""))
    if kind in ("true", "false"):
        return kind == "true"
    if kind == "nil":
        return None
    if kind == "parenthesized_expression":
        return evaluate(node.named_children[0])
    if kind == "unary_expression":
        operator = text(node.child_by_field_name("operator"))
        value = evaluate(node.child_by_field_name("operand"))
        if operator == "&":
            return value
        if operator == "-":
            if isinstance(value, dict) and "@float" in value:
                return {"@float": "-inf"} if value["@float"] == "inf" else value
            return -value
        raise Unsupported(f"operator {operator}")
    if kind == "binary_expression":
        left = evaluate(node.child_by_field_name("left"))
        right = evaluate(node.child_by_field_name("right"))
        operator = text(node.child_by_field_name("operator"))
        if not all(isinstance(v, (int, float)) for v in (left, right)):
            raise Unsupported("arithmetic on non-numbers")
        return {"+": lambda: left + right, "-": lambda: left - right, "*": lambda: left * right,
                "<<": lambda: left << right, "/": lambda: left / right}[operator]()
    if kind == "composite_literal":
        return composite(node.child_by_field_name("type"), node.child_by_field_name("body"))
    if kind == "call_expression":
        return call(node)
    if kind == "type_conversion_expression":
        operand = node.child_by_field_name("operand")
        if text(node.child_by_field_name("type")) == "[]byte" and "string_literal" in operand.type:
            return encoded(go_bytes(operand))
        return evaluate(operand)
    if kind == "selector_expression":
        package, name = text(node.child_by_field_name("operand")), text(node.child_by_field_name("field"))
        if package == "math" and name in MATH:
            return MATH[name]
        if package in ("cases", "custom_rules", "other_package", "yet_another_package"):
            return {"@enum": name}
        raise Unsupported(f"selector {package}.{name}")
    raise Unsupported(f"expression {kind}: {text(node)[:40]}")


def expected(node):
    if node.type != "call_expression":
        raise Unsupported("expected result is not a call")
    name = text(node.child_by_field_name("function"))
    arguments = [a for a in node.child_by_field_name("arguments").named_children if a.type != "comment"]
    if name == "results.Success":
        return {"valid": evaluate(arguments[0])}
    if name == "results.CompilationError":
        return {"compilation_error": True}
    if name == "results.RuntimeError":
        return {"runtime_error": True}
    if name == "results.Violations":
        violations = []
        for argument in arguments:
            fields = evaluate(argument)["fields"]
            violations.append({
                "field": fields.get("Field", ""),
                "rule": fields.get("Rule", ""),
                "rule_id": fields.get("RuleId", ""),
                "for_key": fields.get("ForKey", False),
            })
        return {"violations": violations}
    raise Unsupported(f"expected {name}")


def suites_of(cases_dir):
    """Suite names by the function that makes each, from cases.go."""
    names = {}
    source = (cases_dir / "cases.go").read_text()
    for suite, function in re.findall(r'"([^"]+)":\s+(\w+)\(\)', source):
        names[function] = suite
    return names


def walk(node):
    yield node
    for child in node.children:
        yield from walk(child)


def main(checkout):
    checkout = Path(checkout)
    cases_dir = checkout / "tools/protovalidate-conformance/internal/cases"
    suites = suites_of(cases_dir)
    imported, skipped = [], {}
    total = 0
    for path in sorted(cases_dir.glob("cases_*.go")):
        tree = PARSER.parse(path.read_bytes())
        for function in (n for n in walk(tree.root_node) if n.type == "function_declaration"):
            suite = suites.get(text(function.child_by_field_name("name")))
            if suite is None:
                continue
            for literal in (n for n in walk(function) if n.type == "composite_literal"):
                if text(literal.child_by_field_name("type")) != "suites.Suite":
                    continue
                for element in literal.child_by_field_name("body").named_children:
                    if element.type != "keyed_element":
                        continue
                    total += 1
                    key, value = element.named_children
                    name = go_string(key.named_children[0])
                    if value.type == "literal_element":
                        value = value.named_children[0]
                    if value.type == "composite_literal" and text(value.child_by_field_name("type")) == "suites.Case":
                        value = value.child_by_field_name("body")
                    try:
                        if value.type != "literal_value":
                            raise Unsupported("case is not a literal")
                        case = {}
                        for field in value.named_children:
                            if field.type == "keyed_element":
                                case[text(field.named_children[0])] = field.named_children[1].named_children[0]
                        imported.append({
                            "suite": suite,
                            "case": name,
                            "message": evaluate(case["Message"]),
                            "expected": expected(case["Expected"]),
                        })
                    except (Unsupported, KeyError, ValueError, TypeError, AttributeError, IndexError) as why:
                        reason = str(why).split(":")[0]
                        skipped[reason] = skipped.get(reason, 0) + 1
    (HERE / "cases.json").write_text(json.dumps(imported, indent=0, ensure_ascii=False) + "\n")
    proto = HERE / "proto"
    shutil.rmtree(proto, ignore_errors=True)
    source = checkout / "proto/protovalidate-testing"
    for file in (source / "buf/validate/conformance/cases").rglob("*.proto"):
        target = proto / file.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(file, target)
    print(f"{len(imported)} of {total} cases imported; not imported: {skipped}")


if __name__ == "__main__":
    main(sys.argv[1])
