"""Contract test: the project speaks the real API of the SGLang release it pins, read from SGLang's own source.

SGLang cannot be imported or served on a CPU machine, so nothing here imports it. The pinned wheel
(`ARG SGLANG=` in the Dockerfile, the one place the version is set) is fetched once with
`pip download --no-deps` into a cache folder (`$RLAD_TEST_CACHE/sglang-<version>`, default
`~/.cache/rlad-megatron/sglang-<version>`), and the few source files that define the API are read
straight out of it and parsed with `ast`:

* `srt/entrypoints/http_server.py`: the routes (`@app.get/post/api_route`), each handler's request class,
  its auth level and whether it is deprecated;
* `srt/managers/io_struct.py`: the fields of every request class (inherited ones included) and which are
  required;
* `srt/sampling/sampling_params.py` and `api/v1/api_types.py`: the sampling-parameter fields, and the JSON
  contract `/generate` checks every body against (which keys it rejects, which value types it accepts);
* `srt/server_args.py` + the namespace classes it assembles ServerArgs from (`srt/arg_groups/fields/*`):
  every command-line flag of `python -m sglang.launch_server`, named by the rule in
  `srt/arg_groups/arg_utils.py` (`"--" + field.replace("_", "-")`, or `Arg(cli_name=...)`, plus aliases).

`sglang_source()` returns those facts (`SGLangFacts`); other tests in this folder can reuse it with
`from test_sglang_contract import sglang_source`.

What the project sends is captured on the wire: a recording HTTP server answers like SGLang (good enough
for the clients to proceed) and the project's real clients are driven against it; every (method, path,
JSON body) must match a route and its request class (`REQUEST_CLASSES`). The commands the project starts
SGLang servers and sglang-router with (`launch/node.py`, `engines/sglang_fleet.py`, `engines/fleet.py`)
must use real flags only (argparse's prefix matching would otherwise accept e.g. `--tp` for `--tp-size`).
The router's flags come from the installed sglang-router (the pinned version, `ARG SGLANG_ROUTER=`).

Adding an endpoint: put its path and request class in REQUEST_CLASSES, and a driver (a function that makes
the project's code send the request to the recorder's `url`) in DRIVERS. Another release:
`RLAD_SGLANG_VERSION=X.Y.Z pytest tests/unit/test_sglang_contract.py`. Without access to the package registry
the tests that need the wheel are skipped, naming pip's error.
"""

from __future__ import annotations

import argparse
import ast
import base64
import contextlib
import difflib
import functools
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parents[2]


# =====================================================================================================
# The pins
# =====================================================================================================
def dockerfile_pin(arg: str) -> str:
    """The version an `ARG NAME=version` line of the Dockerfile pins (the image installs exactly that)."""
    m = re.search(rf"^ARG\s+{re.escape(arg)}=(\S+)\s*$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    if m is None:
        raise AssertionError(f"the Dockerfile has no `ARG {arg}=<version>` line")
    return m.group(1)


def sglang_pin() -> str:
    """The SGLang release checked: $RLAD_SGLANG_VERSION (to try one before bumping the pin), else the Dockerfile's."""
    return os.environ.get("RLAD_SGLANG_VERSION") or dockerfile_pin("SGLANG")


# =====================================================================================================
# sglang_source(): SGLang's API as read from the pinned wheel (reusable; no project imports)
# =====================================================================================================
@dataclass(frozen=True)
class Route:
    methods: frozenset[str]
    handler: str
    body_class: str | None
    """The io_struct request class the handler parses the JSON body into (None: it reads no body)."""
    auth: str = "NORMAL"
    """utils/auth.py level: NORMAL, ADMIN_OPTIONAL (the --api-key works) or ADMIN_FORCE (only --admin-api-key)."""
    deprecated: bool = False


@dataclass(frozen=True)
class SGLangFacts:
    version: str
    routes: dict[str, Route]
    request_fields: dict[str, frozenset[str]]
    """io_struct class -> its fields, inherited ones included."""
    required_fields: dict[str, frozenset[str]]
    sampling_params: frozenset[str]
    """Fields of srt/sampling/sampling_params.py SamplingParams (what the scheduler builds from a request)."""
    api_fields: dict[str, frozenset[str]]
    """api/v1/api_types.py: JSON contract struct -> its keys (GenerateRequest, SamplingParams, ...)."""
    api_rejects_unknown: dict[str, bool]
    api_value_kinds: dict[str, dict[str, frozenset[str]]]
    """struct -> key -> scalar kinds its decoder accepts at the leaves (int, uint, float, bool, str)."""
    server_fields: frozenset[str]
    server_flags: frozenset[str]
    """Every option string `python -m sglang.launch_server` accepts (aliases included)."""
    server_store_true: frozenset[str]
    """Flags that take no value."""
    flag_rule: str
    """The expression arg_utils._field_to_cli_name returns (checked by a test to be the rule used here)."""
    flag_registration: str
    """ast.unparse of arg_utils.add_cli_args_from_dataclass."""
    launch_server: str
    """ast.unparse of sglang/launch_server.py and server_args.prepare_server_args."""


class SourceUnavailable(RuntimeError):
    pass


SOURCES = {  # what is read from the wheel (nothing is imported)
    "routes": "sglang/srt/entrypoints/http_server.py",
    "io_struct": "sglang/srt/managers/io_struct.py",
    "sampling": "sglang/srt/sampling/sampling_params.py",
    "api_types": "sglang/api/v1/api_types.py",
    "server_args": "sglang/srt/server_args.py",
    "arg_utils": "sglang/srt/arg_groups/arg_utils.py",
    "launch_server": "sglang/launch_server.py",
}


def sglang_cache_dir(version: str) -> Path:
    root = os.environ.get("RLAD_TEST_CACHE") or str(Path.home() / ".cache" / "rlad-megatron")
    return Path(root) / f"sglang-{version}"


def sglang_wheel(version: str) -> Path:
    """The pinned wheel, downloaded once (`pip download --no-deps`) into the test cache folder."""
    cache = sglang_cache_dir(version)
    found = sorted(cache.glob(f"sglang-{version}-*.whl"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--timeout",
            "30",
            "--retries",
            "1",
            "--disable-pip-version-check",
            "-q",
            f"sglang=={version}",
            "-d",
            tmp,
        ]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise SourceUnavailable(f"{' '.join(cmd[2:])}: {err}") from None
        wheels = sorted(Path(tmp).glob(f"sglang-{version}-*.whl"))
        if done.returncode != 0 or not wheels:
            lines = (done.stderr or done.stdout).strip().splitlines()
            why = [ln for ln in lines if ln.startswith("ERROR")][-1:] + [ln[:200] for ln in lines if "Error" in ln][:1]
            raise SourceUnavailable(
                f"`pip download sglang=={version}` failed (exit {done.returncode}): " + " | ".join(why or lines[-2:])
            )
        target = cache / wheels[0].name
        os.replace(wheels[0], target)  # atomic: a concurrent run sees the whole wheel or none
        return target


_UNAVAILABLE: dict[str, str] = {}


def sglang_source(version: str | None = None) -> SGLangFacts:
    """The API facts of SGLang `version` (default: the Dockerfile's pin). Inside a test, skips when the wheel
    cannot be fetched (no registry access), naming pip's error; the failure is remembered for the session."""
    version = version or sglang_pin()
    if version in _UNAVAILABLE:
        pytest.skip(_UNAVAILABLE[version])
    try:
        return _facts(version)
    except SourceUnavailable as err:
        _UNAVAILABLE[version] = f"SGLang {version} source unavailable (package registry unreachable?): {err}"
        pytest.skip(_UNAVAILABLE[version])


@functools.cache
def _facts(version: str) -> SGLangFacts:
    wheel = sglang_wheel(version)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        trees: dict[str, ast.Module] = {}

        def tree(path: str) -> ast.Module:
            if path not in trees:
                if path not in names:
                    raise AssertionError(f"{wheel.name} has no {path}: SGLang moved it; update this test")
                trees[path] = ast.parse(z.read(path).decode("utf-8"), filename=path)
            return trees[path]

        meta = z.read(f"sglang-{version}.dist-info/METADATA").decode()
        got = re.search(r"^Version: (\S+)$", meta, re.MULTILINE)
        assert got and got.group(1) == version, f"{wheel.name} is not SGLang {version}"
        io_tree = tree(SOURCES["io_struct"])
        request_fields, required = _class_fields(io_tree)
        api_tree = tree(SOURCES["api_types"])
        api_fields, _ = _class_fields(api_tree)
        server_fields, flags, store_true, rule, registration = _server_cli(tree)
        sa_tree = tree(SOURCES["server_args"])
        prepare = next(n for n in sa_tree.body if isinstance(n, ast.FunctionDef) and n.name == "prepare_server_args")
        return SGLangFacts(
            version=version,
            routes=_routes(tree(SOURCES["routes"]), set(request_fields)),
            request_fields=request_fields,
            required_fields=required,
            sampling_params=_class_fields(tree(SOURCES["sampling"]))[0]["SamplingParams"],
            api_fields=api_fields,
            api_rejects_unknown=_api_rejects_unknown(api_tree),
            api_value_kinds=_api_value_kinds(api_tree),
            server_fields=server_fields,
            server_flags=flags,
            server_store_true=store_true,
            flag_rule=rule,
            flag_registration=registration,
            launch_server=ast.unparse(tree(SOURCES["launch_server"])) + "\n" + ast.unparse(prepare),
        )


def _is_classvar(annotation: ast.expr) -> bool:
    node = annotation.value if isinstance(annotation, ast.Subscript) else annotation
    return (isinstance(node, ast.Name) and node.id == "ClassVar") or (
        isinstance(node, ast.Attribute) and node.attr == "ClassVar"
    )


def _class_fields(tree: ast.Module) -> tuple[dict[str, frozenset[str]], dict[str, frozenset[str]]]:
    """Every module-level class -> (fields, required fields), bases defined in the same module included
    (dataclasses and msgspec Structs both declare fields as annotated class attributes)."""
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    done: dict[str, dict[str, bool]] = {}

    def own(name: str) -> dict[str, bool]:  # field -> has a default
        if name in done:
            return done[name]
        out: dict[str, bool] = {}
        for base in classes[name].bases:
            if isinstance(base, ast.Name) and base.id in classes:
                out.update(own(base.id))
        for stmt in classes[name].body:
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and not _is_classvar(stmt.annotation)
            ):
                out[stmt.target.id] = stmt.value is not None and not _field_without_default(stmt.value)
        done[name] = out
        return out

    fields = {n: frozenset(own(n)) for n in classes}
    required = {n: frozenset(f for f, has_default in own(n).items() if not has_default) for n in classes}
    return fields, required


def _field_without_default(value: ast.expr) -> bool:
    """`field()` / `msgspec.field()` without default or default_factory."""
    if isinstance(value, ast.Call) and getattr(value.func, "id", getattr(value.func, "attr", "")) == "field":
        return not any(k.arg in ("default", "default_factory") for k in value.keywords)
    return False


def _string(node: ast.expr | None) -> str | None:
    """A literal path, or the default of `os.environ.get(NAME, default)`."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Call) and ast.unparse(node.func) in ("os.environ.get", "os.getenv") and len(node.args) == 2:
        return _string(node.args[1])
    return None


def _routes(tree: ast.Module, request_classes: set[str]) -> dict[str, Route]:
    routes: dict[str, Route] = {}
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        auth = "NORMAL"
        for dec in fn.decorator_list:
            if isinstance(dec, ast.Call) and ast.unparse(dec.func) == "auth_level" and dec.args:
                auth = ast.unparse(dec.args[0]).split(".")[-1]
        body_class = None
        for arg in fn.args.args + fn.args.kwonlyargs:
            ann = arg.annotation
            if isinstance(ann, ast.Subscript) and ast.unparse(ann.value) in ("Annotated", "typing.Annotated"):
                ann = ann.slice.elts[0] if isinstance(ann.slice, ast.Tuple) else ann.slice
            if isinstance(ann, ast.Name) and ann.id in request_classes:
                body_class = ann.id
                break
        doc = ast.get_docstring(fn) or ""
        for dec in fn.decorator_list:
            if not (
                isinstance(dec, ast.Call)
                and isinstance(dec.func, ast.Attribute)
                and ast.unparse(dec.func.value) == "app"
            ):
                continue
            kind = dec.func.attr
            if kind in ("get", "post", "put", "delete", "patch", "head"):
                methods = {kind.upper()}
            elif kind == "api_route":
                given = next((k.value for k in dec.keywords if k.arg == "methods"), None)
                methods = {e.value for e in given.elts} if isinstance(given, (ast.List, ast.Tuple)) else {"GET"}
            else:
                continue  # websocket, exception_handler, middleware
            path = _string(dec.args[0] if dec.args else next((k.value for k in dec.keywords if k.arg == "path"), None))
            if path is None:
                continue  # computed at import time from a variable: not a route a client can rely on
            old = routes.get(path)
            routes[path] = Route(
                frozenset(methods) | (old.methods if old else frozenset()),
                fn.name,
                body_class,
                auth,
                "deprecated" in doc.lower(),
            )
    return routes


_EXPECT_KINDS = {
    "_expect_int": "int",
    "_expect_uint": "uint",
    "_expect_float": "float",
    "_expect_bool": "bool",
    "_expect_str": "str",
}


def _api_functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}


def _api_rejects_unknown(tree: ast.Module) -> dict[str, bool]:
    """struct -> whether its decoder refuses keys it does not know (it raises _unknown_field)."""
    out = {}
    for name, fn in _api_functions(tree).items():
        if name.startswith("decode_"):
            out[name[len("decode_") :]] = any(
                isinstance(c, ast.Call) and ast.unparse(c.func) == "_unknown_field" for c in ast.walk(fn)
            )
    return out


def _api_value_kinds(tree: ast.Module) -> dict[str, dict[str, frozenset[str]]]:
    """struct -> key -> leaf kinds, from the `if key == "k": kw["k"] = ... _expect_x(...) / decode_T(...)` chains
    of its generated decoder. Keys decoded into a nested object are left out (checked separately, if at all)."""
    funcs = _api_functions(tree)

    @functools.cache
    def leaf_kinds(name: str, seen: frozenset = frozenset()) -> frozenset[str] | None:
        if name in _EXPECT_KINDS:
            return frozenset([_EXPECT_KINDS[name]])
        fn = funcs.get(name)
        if fn is None or not name.startswith("decode_"):
            return None
        kinds: set[str] = set()
        for call in ast.walk(fn):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
                continue
            callee = call.func.id
            if callee == "_expect_map":
                return None  # an object: not a scalar leaf
            if callee in _EXPECT_KINDS:
                kinds.add(_EXPECT_KINDS[callee])
            elif callee.startswith("decode_") and callee != name and callee not in seen:
                sub = leaf_kinds(callee, seen | {name})
                if sub is None:
                    return None
                kinds |= sub
        return frozenset(kinds) or None

    out: dict[str, dict[str, frozenset[str]]] = {}
    for name, fn in funcs.items():
        if not name.startswith("decode_"):
            continue
        keys: dict[str, frozenset[str]] = {}
        for node in ast.walk(fn):
            if not (
                isinstance(node, ast.If)
                and isinstance(node.test, ast.Compare)
                and ast.unparse(node.test.left) == "key"
                and isinstance(node.test.comparators[0], ast.Constant)
            ):
                continue
            key = node.test.comparators[0].value
            for stmt in node.body:
                callee = next(
                    (
                        c.func.id
                        for c in ast.walk(stmt)
                        if isinstance(c, ast.Call)
                        and isinstance(c.func, ast.Name)
                        and c.func.id.startswith(("_expect_", "decode_"))
                    ),
                    None,
                )
                kinds = leaf_kinds(callee) if callee else None
                if kinds:
                    keys[key] = kinds
                break
        if keys:
            out[name[len("decode_") :]] = keys
    return out


def _unwrap_optional(node: ast.expr) -> ast.expr:
    if isinstance(node, ast.Subscript) and ast.unparse(node.value) in ("Optional", "typing.Optional"):
        return node.slice
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        parts = [p for p in (node.left, node.right) if ast.unparse(p) != "None"]
        return parts[0] if len(parts) == 1 else node
    if (
        isinstance(node, ast.Subscript)
        and ast.unparse(node.value) in ("Union", "typing.Union")
        and isinstance(node.slice, ast.Tuple)
    ):
        parts = [p for p in node.slice.elts if ast.unparse(p) != "None"]
        return parts[0] if len(parts) == 1 else node
    return node


def _server_cli(tree: Callable[[str], ast.Module]):
    """(ServerArgs fields, launch_server flags, flags without a value, the naming rule, the registration code).

    Mirrors arg_utils.add_cli_args_from_dataclass: a field is a flag when its annotation is `A[T, "help"]` or
    `A[T, Arg(...)]` without no_cli; the flag is Arg.cli_name or `"--" + name.replace("_", "-")`, plus
    Arg.aliases; a bool field without a custom action is store_true. ServerArgs.add_cli_args adds a few by hand."""
    arg_utils = tree(SOURCES["arg_utils"])
    funcs = {n.name: n for n in arg_utils.body if isinstance(n, ast.FunctionDef)}
    rule_fn = funcs["_field_to_cli_name"]
    rule = ast.unparse(next(n for n in ast.walk(rule_fn) if isinstance(n, ast.Return)).value)
    registration = ast.unparse(funcs["add_cli_args_from_dataclass"])

    sa = tree(SOURCES["server_args"])
    namespaces = next(
        [e.id for e in n.value.elts]
        for n in sa.body
        if isinstance(n, ast.Assign) and [ast.unparse(t) for t in n.targets] == ["_INPUT_NAMESPACES"]
    )
    imported = {
        a.asname or a.name: n.module for n in sa.body if isinstance(n, ast.ImportFrom) and n.module for a in n.names
    }

    def class_body(module: str, name: str) -> list[ast.stmt]:
        mod = tree(module.replace(".", "/") + ".py")
        cls = next(n for n in mod.body if isinstance(n, ast.ClassDef) and n.name == name)
        local = {n.name for n in mod.body if isinstance(n, ast.ClassDef)}
        stmts: list[ast.stmt] = []
        for base in cls.bases:
            if isinstance(base, ast.Name) and base.id in local:
                stmts += class_body(module, base.id)
        return stmts + cls.body

    fields: set[str] = set()
    flags: set[str] = set()
    store_true: set[str] = set()
    server_args_cls = next(n for n in sa.body if isinstance(n, ast.ClassDef) and n.name == "ServerArgs")
    sources = [stmt for ns in namespaces for stmt in class_body(imported[ns], ns)] + server_args_cls.body
    for stmt in sources:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)) or _is_classvar(stmt.annotation):
            continue
        name, ann = stmt.target.id, stmt.annotation
        fields.add(name)
        if not (
            isinstance(ann, ast.Subscript)
            and ast.unparse(ann.value) in ("A", "Annotated", "typing.Annotated")
            and isinstance(ann.slice, ast.Tuple)
        ):
            continue  # no Arg metadata: not registered from the dataclass
        inner, *metadata = ann.slice.elts
        arg = None
        for m in metadata:
            if isinstance(m, ast.Call) and ast.unparse(m.func) == "Arg":
                arg = {k.arg: k.value for k in m.keywords}
                break
            if isinstance(m, (ast.Constant, ast.JoinedStr, ast.BinOp)):  # a bare help string
                arg = {}
                break
        if arg is None or (isinstance(arg.get("no_cli"), ast.Constant) and arg["no_cli"].value is True):
            continue
        names = [_string(arg.get("cli_name")) or "--" + name.replace("_", "-")]
        if isinstance(arg.get("aliases"), (ast.List, ast.Tuple)):
            names += [_string(e) for e in arg["aliases"].elts if _string(e)]
        flags.update(names)
        if "action" not in arg and ast.unparse(_unwrap_optional(inner)) == "bool":
            store_true.update(names)
    add_cli = next(n for n in server_args_cls.body if isinstance(n, ast.FunctionDef) and n.name == "add_cli_args")
    for call in ast.walk(add_cli):
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "add_argument":
            names = [a.value for a in call.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")]
            flags.update(names)
            action = next((ast.unparse(k.value) for k in call.keywords if k.arg == "action"), "")
            if action in ("'store_true'", "DeprecatedStoreTrueAction"):
                store_true.update(names)
    return frozenset(fields), frozenset(flags), frozenset(store_true), rule, registration


# =====================================================================================================
# The checks (pure: a list of problems, empty when the project matches SGLang)
# =====================================================================================================
REQUEST_CLASSES: dict[str, str | None] = {
    # path -> io_struct class SGLang parses the JSON body into (None: no body)
    "/generate": "GenerateReqInput",
    "/update_weights_from_disk": "UpdateWeightFromDiskReqInput",
    "/init_weights_update_group": "InitWeightsUpdateGroupReqInput",
    "/update_weights_from_distributed": "UpdateWeightsFromDistributedReqInput",
    "/destroy_weights_update_group": "DestroyWeightsUpdateGroupReqInput",
    "/begin_weight_update": "BeginWeightUpdateReqInput",
    "/end_weight_update": "EndWeightUpdateReqInput",
    "/health": None,
    "/health_generate": None,
    "/get_model_info": None,
    "/get_server_info": None,
    "/model_info": None,
    "/server_info": None,
    "/flush_cache": None,
}
UNAUTHENTICATED = ("/health", "/ready", "/metrics")  # SGLang's auth middleware lets these prefixes through


@dataclass
class Call:
    method: str
    path: str
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


def _leaves(value: Any) -> Iterable[Any]:
    if isinstance(value, (list, dict)):
        for v in value.values() if isinstance(value, dict) else value:
            yield from _leaves(v)
    else:
        yield value


def _fits(value: Any, kinds: frozenset[str]) -> bool:
    if value is None:
        return True
    if isinstance(value, bool):
        return "bool" in kinds
    if isinstance(value, int):
        return bool(kinds & {"int", "float"}) or ("uint" in kinds and value >= 0)
    if isinstance(value, float):
        return "float" in kinds
    if isinstance(value, str):
        return "str" in kinds
    return False


def _check_keys(where: str, body: dict, known: frozenset[str], what: str) -> list[str]:
    unknown = sorted(set(body) - known)
    return [f"{where}: {k!r} is not a field of {what}" + _hint(k, known) for k in unknown]


def _hint(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _flag_hint(flag: str, known: Iterable[str]) -> str:
    """What argparse's prefix matching would have made of a non-flag (SGLang's parser allows abbreviations)."""
    prefixed = sorted(k for k in known if k.startswith(flag))
    if len(prefixed) == 1:
        return f" (argparse reads it as {prefixed[0]!r} only by prefix matching; spell it out)"
    if prefixed:
        return f" (an ambiguous prefix of {prefixed[:4]})"
    return _hint(flag, known)


def _check_values(where: str, body: dict, kinds: dict[str, frozenset[str]]) -> list[str]:
    return [
        f"{where}: {k}={v!r} does not decode as {'/'.join(sorted(kinds[k]))} in SGLang's JSON contract"
        for k, v in body.items()
        if k in kinds and not all(_fits(leaf, kinds[k]) for leaf in _leaves(v))
    ]


def check_calls(calls: Iterable[Call], facts: SGLangFacts, api_key: str = "") -> list[str]:
    """Problems with requests the project sent, against SGLang's routes, request classes and /generate contract."""
    problems: list[str] = []
    for c in calls:
        where = f"{c.method} {c.path}"
        route = facts.routes.get(c.path)
        if route is None:
            problems.append(f"{where}: SGLang {facts.version} has no such route" + _hint(c.path, facts.routes))
            continue
        if c.method not in route.methods:
            problems.append(f"{where}: SGLang serves {c.path} for {sorted(route.methods)} only")
        if route.auth == "ADMIN_FORCE":
            problems.append(f"{where}: needs SGLang's --admin-api-key, which the project never sets")
        if api_key and not c.path.startswith(UNAUTHENTICATED) and c.headers.get("authorization") != f"Bearer {api_key}":
            problems.append(f"{where}: sent without `Authorization: Bearer <key>` to a keyed server")
        if c.path not in REQUEST_CLASSES:
            problems.append(f"{where}: not in REQUEST_CLASSES; add the path with its request class")
            continue
        cls = REQUEST_CLASSES[c.path]
        if cls is None:
            if c.body not in (None, {}, b""):
                problems.append(f"{where}: sends a body, but SGLang's {route.handler} reads none")
            continue
        body = {} if c.body is None else c.body
        if not isinstance(body, dict):
            problems.append(f"{where}: the body must be a JSON object ({cls}), got {type(body).__name__}")
            continue
        problems += _check_keys(where, body, facts.request_fields[cls], cls)
        problems += [
            f"{where}: required field {k!r} of {cls} is missing" for k in sorted(facts.required_fields[cls] - set(body))
        ]
        if c.path == "/generate":
            problems += _check_generate(where, body, facts)
    return list(dict.fromkeys(problems))


def _check_generate(where: str, body: dict, facts: SGLangFacts) -> list[str]:
    """/generate bodies also pass SGLang's JSON contract (api_types.GenerateRequest) before the dataclass parse;
    a key it rejects, or a value of the wrong type, is a 400."""
    problems = []
    if facts.api_rejects_unknown.get("GenerateRequest"):
        problems += _check_keys(where, body, facts.api_fields["GenerateRequest"], "the /generate JSON contract")
    problems += _check_values(where, body, facts.api_value_kinds.get("GenerateRequest", {}))
    sps = body.get("sampling_params")
    for i, sp in enumerate(sps if isinstance(sps, list) else [sps]):
        if sp is None:
            continue
        at = f"{where} sampling_params" + (f"[{i}]" if isinstance(sps, list) else "")
        if not isinstance(sp, dict):
            problems.append(f"{at}: must be an object, got {type(sp).__name__}")
            continue
        problems += _check_keys(at, sp, facts.sampling_params, "SamplingParams")
        if facts.api_rejects_unknown.get("SamplingParams"):
            problems += _check_keys(
                at,
                sp,
                facts.api_fields["SamplingParams"],
                "the /generate JSON contract's SamplingParams (unknown keys are a 400)",
            )
        problems += _check_values(at, sp, facts.api_value_kinds.get("SamplingParams", {}))
    return problems


def _after(argv: list[str], module: str) -> list[str]:
    """The arguments after `-m <module>`."""
    for i in range(len(argv) - 1):
        if argv[i] == "-m" and argv[i + 1] == module:
            return argv[i + 2 :]
    raise AssertionError(f"not a `-m {module}` command: {argv}")


def check_server_argv(argv: list[str], facts: SGLangFacts) -> list[str]:
    """Every `--flag` after `sglang.launch_server` must be a real ServerArgs flag (exact, not an argparse prefix);
    flags that take no value must not be given one."""
    args = _after(argv, "sglang.launch_server")
    problems = []
    for j, tok in enumerate(args):
        if not tok.startswith("--"):
            continue
        flag = tok.split("=", 1)[0]
        if flag not in facts.server_flags:
            problems.append(
                f"{flag}: not a flag of SGLang {facts.version}'s launch_server" + _flag_hint(flag, facts.server_flags)
            )
        elif (
            flag in facts.server_store_true
            and "=" not in tok
            and j + 1 < len(args)
            and not args[j + 1].startswith("--")
        ):
            problems.append(f"{flag} takes no value, but {args[j + 1]!r} follows it")
    return problems


def router_parser() -> argparse.ArgumentParser:
    """The parser `python -m sglang_router.launch_router` builds (parse_router_args), with prefix matching off."""
    from sglang_router.router_args import RouterArgs

    parser = argparse.ArgumentParser(prog="sglang_router.launch_router", allow_abbrev=False)
    RouterArgs.add_cli_args(parser, use_router_prefix=False)
    return parser


def check_router_argv(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    args = _after(argv, "sglang_router.launch_router")
    known = set(parser._option_string_actions)
    problems = [
        f"{t.split('=', 1)[0]}: not a flag of sglang-router" + _flag_hint(t.split("=", 1)[0], known)
        for t in args
        if t.startswith("--") and t.split("=", 1)[0] not in known
    ]
    if not problems:  # values too (choices, types, arity): argparse as the router runs it
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                parser.parse_args(args)
        except SystemExit:
            problems.append(f"sglang-router refuses the arguments: {err.getvalue().strip().splitlines()[-1]}")
    return problems


# =====================================================================================================
# A recording server that answers like SGLang
# =====================================================================================================
class Recorder:
    """Records every request; answers /generate, the weight endpoints and the info endpoints with SGLang's shapes
    (any other POST gets {"success": true, "message": ...}, any other GET {})."""

    def __init__(self):
        self.calls: list[Call] = []
        self.lock = threading.Lock()
        self.weight_version = "default"
        self.failures: dict[str, list[int]] = {}  # path -> statuses to answer with before answering normally
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self):
                size = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(size) if size else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw
                path = urlsplit(self.path).path
                with recorder.lock:
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    recorder.calls.append(Call(self.command, path, body, headers))
                try:
                    status, answer = recorder.answer(self.command, path, body)
                except Exception as err:  # noqa: BLE001 (a body the fake cannot answer: SGLang's 400 shape)
                    status, answer = 400, {"error": {"message": f"{type(err).__name__}: {err}"}}
                data = b"" if answer is None else json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Recorder:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fail_next(self, path: str, *statuses: int) -> None:
        with self.lock:
            self.failures.setdefault(path, []).extend(statuses)

    def answer(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        with self.lock:
            pending = self.failures.get(path)
            if pending:
                return pending.pop(0), {"error": {"message": "injected failure"}}
        if path in ("/health", "/health_generate"):
            return 200, None
        if path in ("/get_model_info", "/model_info"):
            return 200, {
                "model_path": "/models/fake",
                "tokenizer_path": "/models/fake",
                "is_generation": True,
                "weight_version": self.weight_version,
            }
        if path in ("/get_server_info", "/server_info"):
            return 200, {"version": "fake", "tp_size": 1, "dp_size": 1, "weight_version": self.weight_version}
        if path == "/generate" and method in ("POST", "PUT"):
            return 200, fake_generate(body, self.weight_version)
        if method == "POST":
            if isinstance(body, dict) and body.get("weight_version") is not None:
                self.weight_version = str(body["weight_version"])
            extra = {"num_paused_requests": 0} if path == "/update_weights_from_disk" else {}
            return 200, {"success": True, "message": "Succeeded.", **extra}
        return 200, {}


def _per_prompt(value: Any, i: int, batch: bool) -> Any:
    return value[i] if batch and isinstance(value, list) else value


def fake_generate(body: dict, weight_version: str) -> Any:
    """SGLang's /generate answer: one dict for one prompt (n=1), else a list (output k = prompt k % B)."""
    ids = body["input_ids"]
    batch = bool(ids) and isinstance(ids[0], list)
    prompts = ids if batch else [ids]
    sps = body.get("sampling_params") or {}
    sps = sps if isinstance(sps, list) else [sps] * len(prompts)
    n = int(sps[0].get("n") or 1)
    outs = []
    for k in range(n * len(prompts)):
        i = k % len(prompts)
        prompt, sp = prompts[i], sps[i]
        max_new = sp.get("max_new_tokens", 128)
        stops = sp.get("stop_token_ids") or []
        out = [5 + t for t in range(min(max_new, 3))]
        if out and stops:
            out[-1] = stops[0]
            finish = {"type": "stop", "matched": stops[0]}
        else:
            finish = {"type": "length", "length": len(out)}
        meta = {
            "id": f"req-{k}",
            "finish_reason": finish,
            "prompt_tokens": len(prompt),
            "completion_tokens": len(out),
            "cached_tokens": 0,
            "weight_version": weight_version,
            "e2e_latency": 0.01,
        }
        if _per_prompt(body.get("return_logprob"), i, batch):
            start = _per_prompt(body.get("logprob_start_len", -1), i, batch)
            start = len(prompt) if start is None or start < 0 else start  # -1: output tokens only
            top = _per_prompt(body.get("top_logprobs_num", 0), i, batch) or 0
            first = [[None, prompt[start], None]] if start < len(prompt) else []
            meta["input_token_logprobs"] = first + [[-0.5, t, None] for t in prompt[start + 1 :]]
            meta["output_token_logprobs"] = [[-0.25, t, None] for t in out]
            if top:
                others = [[-2.0 - j, j, None] for j in range(top - 1)]
                meta["input_top_logprobs"] = [None] * len(first) + [
                    [[-0.5, t, None], *others] for t in prompt[start + 1 :]
                ]
                meta["output_top_logprobs"] = [[[-0.25, t, None], *others] for t in out]
        if body.get("return_routed_experts"):  # base64 int32 [fed tokens, layers, k]; this fake: 2 layers, top-2
            start = body.get("routed_experts_start_len", 0)
            rows = len(prompt) + len(out) - 1 - start
            meta["routed_experts"] = base64.b64encode(bytes(4 * rows * 2 * 2)).decode("ascii")
        outs.append({"text": "", "output_ids": out, "meta_info": meta})
    return outs[0] if not batch and n == 1 else outs


# =====================================================================================================
# Drivers: make the project's code send its requests to `url` (one function per kind of request)
# =====================================================================================================
API_KEY = "contract-test-key"


def _engine(url: str):
    from rlad_megatron.engines.client import HttpEngine

    return HttpEngine([url], api_key=API_KEY, request_timeout_s=20.0, max_retries=1, backoff_s=0.01, cooldown_s=0.05)


def drive_generate(rec: Recorder, tmp_path: Path) -> None:
    from rlad_megatron.engines.base import SamplingParams

    engine = _engine(rec.url)
    try:
        sp = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=4, stop_token_ids=(7,), seed=11)
        outs = engine.generate([[1, 2, 3], [4, 5]], sp, n=2)
        assert [len(o) for o in outs] == [2, 2] and outs[0][0].finish_reason == "stop"
        engine.generate([[1, 2]], SamplingParams(temperature=0.0, max_new_tokens=2, ignore_eos=True))  # greedy, no seed
    finally:
        engine.close()


def drive_generate_routed_experts(rec: Recorder, tmp_path: Path) -> None:
    """MoE routing replay: return_routed_experts on /generate, the answer decoded to [fed tokens, layers, k]."""
    from rlad_megatron.engines.base import SamplingParams
    from rlad_megatron.engines.client import HttpEngine

    engine = HttpEngine([rec.url], api_key=API_KEY, request_timeout_s=20.0, max_retries=1, routes_shape=(2, 2))
    try:
        (outs,) = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3, seed=1, return_routed_experts=True))
        assert outs[0].routed_experts.shape == (3 + len(outs[0].response_ids) - 1, 2, 2)
    finally:
        engine.close()


def drive_score(rec: Recorder, tmp_path: Path) -> None:
    engine = _engine(rec.url)
    try:
        ids, starts = [[1, 2, 3, 4, 5], [6, 7, 8]], [3, 1]
        assert [len(s.logprobs) for s in engine.score(ids, starts, top_k=0)] == [2, 2]
        tops = engine.score(ids, starts, top_k=3)
        assert [len(s.topk_ids) for s in tops] == [2, 2] and len(tops[0].topk_ids[0]) == 3
    finally:
        engine.close()


def drive_update_from_disk_and_rejoin(rec: Recorder, tmp_path: Path) -> None:
    """Weights from disk; then a 503 takes the server out, and it rejoins (/health, then its weight version)."""
    from rlad_megatron.engines.base import SamplingParams

    engine = _engine(rec.url)
    try:
        (tmp_path / "step_3").mkdir(exist_ok=True)
        engine.update_weights(path=str(tmp_path / "step_3"), version=3)
        rec.fail_next("/generate", 503)
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=2, seed=1))
        assert engine.health()
    finally:
        engine.close()


def drive_wait_healthy(rec: Recorder, tmp_path: Path) -> None:
    from rlad_megatron.engines.fleet import ServerProcess

    ServerProcess(["unused"], rec.url).wait_healthy(10.0, headers={"Authorization": f"Bearer {API_KEY}"})


def drive_weight_sync(rec: Recorder, tmp_path: Path) -> None:
    """The trainer's distributed weight sync (engines/weight_sync.py), HTTP side only: the process group and
    the broadcast are stubbed (the recorder cannot join one); every call the trainer sends is real."""
    from unittest import mock

    import torch

    from rlad_megatron.engines import weight_sync as ws

    with (
        mock.patch.object(ws, "init_custom_process_group", lambda *a, **k: object()),
        mock.patch.object(ws, "destroy_group", lambda pg: None),
        mock.patch("torch.distributed.broadcast", lambda *a, **k: None),
    ):
        calls = ws.ServerCalls(API_KEY, timeout_s=10.0)
        sender = ws.StageSender(0, calls, "127.0.0.1", "nccl", 10.0)
        sender.connect([rec.url], generation=1)
        calls.post_all([rec.url], "/begin_weight_update", {})
        sender.send([("model.embed_tokens.weight", torch.zeros(4, 2, dtype=torch.bfloat16))], version=3)
        calls.post_all([rec.url], "/end_weight_update", {})
        assert calls.versions([rec.url]) == {rec.url: "3"}
        sender.close()


DRIVERS: dict[str, Callable[[Recorder, Path], None]] = {
    "generate": drive_generate,
    "generate_routed_experts": drive_generate_routed_experts,
    "score": drive_score,
    "update_weights_from_disk": drive_update_from_disk_and_rejoin,
    "wait_healthy": drive_wait_healthy,
    "weight_sync": drive_weight_sync,
}
EXPECTED_PATHS = {
    "/generate",
    "/update_weights_from_disk",
    "/health",
    "/health_generate",  # the drivers reach these
    "/init_weights_update_group",
    "/begin_weight_update",
    "/update_weights_from_distributed",
    "/end_weight_update",
    "/destroy_weights_update_group",
    "/server_info",
}


# =====================================================================================================
# Tests
# =====================================================================================================
@pytest.fixture(scope="module")
def facts() -> SGLangFacts:
    return sglang_source()


def test_sglang_source_reads_the_pinned_release(facts):
    assert facts.version == sglang_pin()
    if not os.environ.get("RLAD_SGLANG_VERSION"):
        assert facts.version == dockerfile_pin("SGLANG")
    assert {"/generate", "/update_weights_from_disk", "/health"} <= set(facts.routes)
    assert {"input_ids", "sampling_params", "return_logprob"} <= facts.request_fields["GenerateReqInput"]
    assert "rid" in facts.request_fields["UpdateWeightFromDiskReqInput"]  # inherited from BaseReq
    assert {"temperature", "top_k", "sampling_seed"} <= facts.sampling_params
    assert {"--model-path", "--tp-size", "--mem-fraction-static", "--config"} <= facts.server_flags
    assert "--trust-remote-code" in facts.server_store_true and "--port" not in facts.server_store_true
    assert {"tp_size", "mem_fraction_static"} <= facts.server_fields


def test_flags_are_named_by_sglangs_rule(facts):
    """The flag set above assumes arg_utils' registration; fail loudly if SGLang changes it."""
    assert facts.flag_rule == "'--' + name.replace('_', '-')", f"SGLang now names flags {facts.flag_rule}"
    for marker in (
        "if arg_meta is None:",
        "if arg_meta.no_cli:",
        "arg_meta.cli_name or _field_to_cli_name(field.name)",
        "[cli_name] + (arg_meta.aliases or [])",
        "inner_type is bool",
    ):
        assert marker in facts.flag_registration, f"arg_utils.add_cli_args_from_dataclass no longer has {marker!r}"
    for marker in ("prepare_server_args(sys.argv[1:])", "ServerArgs.add_cli_args(parser)"):
        assert marker in facts.launch_server, f"sglang.launch_server no longer parses flags via {marker!r}"


def test_request_class_table_matches_sglangs_handlers(facts):
    for path, cls in REQUEST_CLASSES.items():
        assert path in facts.routes, f"{path}: not a route of SGLang {facts.version}"
        route = facts.routes[path]
        assert route.body_class == cls, f"{path}: SGLang's {route.handler} parses {route.body_class}, the table: {cls}"


def test_http_requests_match_sglang(facts, tmp_path):
    """Drive the project's HTTP clients against the recording server; every request must be one SGLang accepts."""
    with Recorder() as rec:
        for name, drive in DRIVERS.items():
            try:
                drive(rec, tmp_path)
            except Exception as err:
                raise AssertionError(f"driver {name} failed against the SGLang-shaped fake: {err}") from err
    sent = {c.path for c in rec.calls}
    assert EXPECTED_PATHS <= sent, f"the drivers never sent {sorted(EXPECTED_PATHS - sent)}"
    problems = check_calls(rec.calls, facts, api_key=API_KEY)
    assert not problems, "requests SGLang would not understand:\n  " + "\n  ".join(problems)
    deprecated = sorted({c.path for c in rec.calls if facts.routes[c.path].deprecated})
    if deprecated:
        warnings.warn(f"SGLang {facts.version} deprecates {deprecated}", stacklevel=1)


def test_a_misspelled_key_sent_by_the_client_is_reported(facts, tmp_path, monkeypatch):
    """The recorded body is what the client sent: misspell two keys on the way out and the check names both."""
    import httpx

    post = httpx.AsyncClient.post

    async def misspelling_post(self, url, *args, json=None, **kwargs):
        if json is not None and str(url).endswith("/generate"):
            sp = dict(json["sampling_params"])
            sp["seed"] = sp.pop("sampling_seed", 0)
            json = {**json, "sampling_params": sp, "retrun_logprob": True}
        return await post(self, url, *args, json=json, **kwargs)

    monkeypatch.setattr(httpx.AsyncClient, "post", misspelling_post)
    with Recorder() as rec:
        drive_generate(rec, tmp_path)
    problems = "\n".join(check_calls(rec.calls, facts, api_key=API_KEY))
    assert "'retrun_logprob' is not a field of GenerateReqInput (did you mean 'return_logprob'?)" in problems
    assert "sampling_params: 'seed' is not a field of SamplingParams" in problems


def test_checks_report_what_sglang_would_refuse(facts):
    """Each check can fail: fake requests with one mistake each."""
    ok = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2, "sampling_seed": 3}, "return_logprob": True}
    key = {"authorization": f"Bearer {API_KEY}"}
    cases = {
        "'bogus_field' is not a field of GenerateReqInput": Call("POST", "/generate", {**ok, "bogus_field": 1}, key),
        "'temprature' is not a field of SamplingParams (did you mean 'temperature'?)": Call(
            "POST", "/generate", {**ok, "sampling_params": {"temprature": 1.0}}, key
        ),
        "the /generate JSON contract's SamplingParams": Call(
            "POST", "/generate", {**ok, "sampling_params": {"stop_strs": ["x"]}}, key
        ),  # an internal field: the contract refuses it
        "sampling_seed='3' does not decode as int": Call(
            "POST", "/generate", {**ok, "sampling_params": {"sampling_seed": "3"}}, key
        ),
        "logprob_start_len=1.5 does not decode as int": Call(
            "POST", "/generate", {**ok, "logprob_start_len": 1.5}, key
        ),
        "no such route": Call("POST", "/update_weights_from_disc", {"model_path": "/x"}, key),
        "for ['POST'] only": Call("GET", "/update_weights_from_disk", None, key),
        "required field 'model_path' of UpdateWeightFromDiskReqInput is missing": Call(
            "POST", "/update_weights_from_disk", {"weight_version": "1"}, key
        ),
        "'names' is not a field of InitWeightsUpdateGroupReqInput": Call(
            "POST",
            "/init_weights_update_group",
            {"master_address": "a", "master_port": 1, "rank_offset": 1, "world_size": 2, "names": []},
            key,
        ),
        "without `Authorization: Bearer <key>`": Call("POST", "/generate", ok, {}),
        "not in REQUEST_CLASSES": Call("POST", "/abort_request", {"rid": "x"}, key),
        "reads none": Call("GET", "/get_model_info", {"x": 1}, key),
    }
    assert not check_calls([Call("POST", "/generate", ok, key), Call("GET", "/health")], facts, api_key=API_KEY)
    for expected, call in cases.items():
        problems = check_calls([call], facts, api_key=API_KEY)
        assert any(expected in p for p in problems), f"{expected!r} not reported for {call}: {problems}"
    argv = [
        "python",
        "-m",
        "sglang.launch_server",
        "--model-path",
        "m",
        "--tp",
        "2",
        "--trust-remote-code",
        "true",
        "--mem-fraction-static=0.8",
    ]
    assert check_server_argv(argv, facts) == [
        f"--tp: not a flag of SGLang {facts.version}'s launch_server (argparse reads it as '--tp-size' only by "
        "prefix matching; spell it out)",
        "--trust-remote-code takes no value, but 'true' follows it",
    ]


def _recipe_commands(overrides: list[str], keys: dict[str, str]) -> tuple[list[list[str]], list[list[str]]]:
    from rlad_megatron.config import load_config
    from rlad_megatron.launch.node import node_commands
    from rlad_megatron.launch.topology import plan_topology

    recipe = str(REPO / "examples" / "qwen3_math" / "recipe.yaml")
    cfg = load_config(recipe, overrides)
    topo = plan_topology(cfg)
    hosts = [f"node{i}" for i in range(topo.nodes)]
    servers, routers = [], []
    for node in range(topo.nodes):
        cmds = node_commands(cfg, topo, node, hosts, recipe, [], "python", keys)
        servers += [argv for _, argv in cmds["servers"]]
        routers += [argv for _, argv in cmds["routers"]]
    return servers, routers


NODE_CASES = {  # the qwen3_math recipe (server_args: mem_fraction_static) plus:
    "bool server_args, keyed teacher": (
        ["rollout.server_args.enable_deterministic_inference=true", "teacher.server_args.disable_radix_cache=false"],
        {"teacher": "k"},
    ),
    "teacher spanning two nodes": (["launch.teacher_tp=16"], {}),
}


@pytest.mark.parametrize("case", list(NODE_CASES))
def test_node_agent_starts_sglang_and_router_with_real_flags(facts, case):
    overrides, keys = NODE_CASES[case]
    servers, routers = _recipe_commands(overrides, keys)
    assert servers and routers
    problems = [f"{p}   in: {' '.join(argv)}" for argv in servers for p in check_server_argv(argv, facts)]
    parser = _pinned_router_parser()
    problems += [f"{p}   in: {' '.join(argv)}" for argv in routers for p in check_router_argv(argv, parser)]
    assert not problems, "\n".join(problems)
    flat = [t for argv in servers for t in argv]  # the case exercised what it is named for
    assert "--mem-fraction-static" in flat and "--tp-size" in flat
    assert ("--nnodes" in flat) == (case == "teacher spanning two nodes")


def test_fleet_starts_sglang_with_real_flags(facts):
    from rlad_megatron.engines.sglang_fleet import sglang_server_cmd

    args = {
        "tp_size": 2,
        "mem_fraction_static": 0.8,
        "enable_deterministic_inference": True,
        "disable_radix_cache": False,
        "enable_return_routed_experts": True,  # what rollout.kind=sglang adds under model.routing_replay
    }
    argv = sglang_server_cmd("/models/m", 30000, "127.0.0.1", args, 2, api_key="k")
    assert "--tp-size" in argv and "--enable-deterministic-inference" in argv
    assert check_server_argv(argv, facts) == []


def test_fleet_turns_a_legacy_tp_key_into_a_real_flag(facts):
    """`server_args: {tp: 8}` (the spelling older docs used) must reach SGLang as --tp-size (or be refused):
    `--tp` is no SGLang flag and only worked through argparse's prefix matching."""
    from rlad_megatron.engines.sglang_fleet import sglang_server_cmd

    try:
        argv = sglang_server_cmd("/models/m", 30000, "127.0.0.1", {"tp": 2}, 0)
    except ValueError:
        return  # refusing the key is fine too
    problems = check_server_argv(argv, facts)
    if problems and all(p.startswith("--tp:") for p in problems):
        pytest.xfail(
            "engines/sglang_fleet.py passes server_args `tp` as `--tp`; the fix maps it to SGLang's "
            "--tp-size (normalize_server_args)"
        )
    assert problems == []


def _pinned_router_parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    pin = dockerfile_pin("SGLANG_ROUTER")
    assert f'"sglang-router=={pin}"' in (REPO / "setup.py").read_text(), (
        f"setup.py's [cpu] extra must pin sglang-router=={pin}, like the Dockerfile"
    )
    installed = version("sglang-router")
    if installed != pin:
        pytest.skip(f"this venv has sglang-router {installed}, the pin is {pin}: run `make setup`")
    return router_parser()


def test_fleet_starts_the_router_with_real_flags(tmp_path, monkeypatch):
    from rlad_megatron.engines import fleet

    started: list[list[str]] = []

    class NotStarted:
        def __init__(self, cmd, url, *args, **kwargs):
            started.append(list(cmd))
            self.url = url

        def start(self):
            return self

        def wait_healthy(self, *args, **kwargs):
            pass

    monkeypatch.setattr(fleet, "ServerProcess", NotStarted)
    assert fleet.launch_router(["http://127.0.0.1:30001", "http://127.0.0.1:30002"], 30800, str(tmp_path)) is not None
    assert len(started) == 1
    assert check_router_argv(started[0], _pinned_router_parser()) == []
    assert check_router_argv(
        ["python", "-m", "sglang_router.launch_router", "--worker-url", "http://a"], _pinned_router_parser()
    ) == [
        "--worker-url: not a flag of sglang-router (argparse "
        "reads it as '--worker-urls' only by prefix matching; "
        "spell it out)"
    ]


def test_the_wheel_is_downloaded_once(facts):
    """Later runs read the cached wheel (no network)."""
    assert [w.name for w in sglang_cache_dir(facts.version).glob("*.whl")] == [sglang_wheel(facts.version).name]
