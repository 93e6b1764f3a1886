#!/usr/bin/env python3
"""Renders the Open Inference Protocol's gRPC definition as .proto text from the descriptor
that KServe publishes in its Python package (kserve/protocol/grpc/grpc_predict_v2_pb2.py, a
serialized FileDescriptorProto of grpc_predict_v2.proto; Apache-2.0). The package ships no
.proto file; its descriptor is the published definition, field for field.

    k=$(mktemp -d)
    pip download kserve==0.21.0 --no-deps -d "$k" && unzip -o "$k"/*.whl -d "$k"
    python3 proto/render.py "$k"/kserve/protocol/grpc/grpc_predict_v2_pb2.py \
        > proto/grpc_predict_v2.proto

Needs the `protobuf` Python package only.
"""

import importlib.util
import sys

from google.protobuf import descriptor_pb2

TYPES = {
    1: "double", 2: "float", 3: "int64", 4: "uint64", 5: "int32", 8: "bool", 9: "string",
    12: "bytes", 13: "uint32",
}


def field_type(f, scope: str) -> str:
    if f.type in (11, 14):  # message, enum
        return f.type_name[len(scope) + 2:] if f.type_name.startswith(f".{scope}.") else \
            f.type_name.lstrip(".")
    return TYPES[f.type]


def render_message(m, scope: str, indent: str, out: list) -> None:
    out.append(f"{indent}message {m.name} {{")
    inner = indent + "  "
    maps = {n.name: n for n in m.nested_type if n.options.map_entry}
    for n in m.nested_type:
        if not n.options.map_entry:
            render_message(n, scope, inner, out)
    oneofs: dict = {}
    for f in m.field:
        if f.HasField("oneof_index"):
            oneofs.setdefault(f.oneof_index, []).append(f)
    done = set()
    for f in m.field:
        if f.HasField("oneof_index"):
            i = f.oneof_index
            if i in done:
                continue
            done.add(i)
            out.append(f"{inner}oneof {m.oneof_decl[i].name} {{")
            for g in oneofs[i]:
                out.append(f"{inner}  {field_type(g, scope)} {g.name} = {g.number};")
            out.append(f"{inner}}}")
            continue
        entry = f.type_name.rsplit(".", 1)[-1]
        if f.type == 11 and entry in maps:
            k, v = maps[entry].field
            out.append(f"{inner}map<{field_type(k, scope)}, {field_type(v, scope)}> "
                       f"{f.name} = {f.number};")
            continue
        label = "repeated " if f.label == 3 else ""
        out.append(f"{inner}{label}{field_type(f, scope)} {f.name} = {f.number};")
    out.append(f"{indent}}}")


def main() -> None:
    spec = importlib.util.spec_from_file_location("pb2", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fd = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(fd)
    out = [
        "// The Open Inference Protocol over gRPC (KServe's grpc_predict_v2.proto), rendered by",
        "// proto/render.py from the descriptor KServe publishes in its Python package",
        "// (kserve 0.21.0 on PyPI, kserve/protocol/grpc/grpc_predict_v2_pb2.py).",
        "// Copyright The KServe Authors. Licensed under the Apache License, Version 2.0:",
        "// http://www.apache.org/licenses/LICENSE-2.0",
        "",
        f'syntax = "{fd.syntax or "proto3"}";',
        f"package {fd.package};",
    ]
    for opt, value in fd.options.ListFields():
        out.append(f'option {opt.name} = "{value}";')
    out.append("")
    for s in fd.service:
        out.append(f"service {s.name} {{")
        for m in s.method:
            out.append(f"  rpc {m.name}({m.input_type.lstrip('.').split('.')[-1]}) returns "
                       f"({m.output_type.lstrip('.').split('.')[-1]}) {{}}")
        out.append("}")
        out.append("")
    for m in fd.message_type:
        render_message(m, fd.package, "", out)
        out.append("")
    print("\n".join(out).rstrip() + "\n")


if __name__ == "__main__":
    main()
