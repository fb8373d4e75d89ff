"""The package as shipped: typing markers, stubs that match the runtime, and
docstrings on everything public."""

import ast
import inspect
from pathlib import Path

import pytest

import pylocksfile as pkg

PKG_DIR = Path(pkg.__file__).parent
NATIVE_CLASSES = ["pylocksfile", "LocksFile", "Guard", "Holder"]


def public_members(cls):
    return sorted(n for n in dir(cls) if not n.startswith("_") and n not in dir(object))


def stub_tree():
    stub = PKG_DIR / "_native.pyi"
    assert stub.is_file(), "the native module has no .pyi stub"
    return ast.parse(stub.read_text())


def test_py_typed_marker():
    assert (PKG_DIR / "py.typed").is_file()


def test_version_is_a_version():
    parts = pkg.__version__.split(".")
    assert len(parts) >= 2 and all(p.isdigit() for p in parts[:2])


@pytest.mark.parametrize("name", NATIVE_CLASSES)
def test_stub_describes_every_public_member(name):
    classes = {n.name: n for n in stub_tree().body if isinstance(n, ast.ClassDef)}
    assert name in classes, f"{name} missing from the stub"
    in_stub = {
        n.name for n in classes[name].body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
    } | {n.target.id for n in classes[name].body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    runtime = set(public_members(getattr(pkg, name)))
    assert runtime - in_stub == set(), f"{name}: not in the stub"
    assert {n for n in in_stub if not n.startswith("_")} - runtime == set(), f"{name}: in the stub only"


def test_stub_names_every_native_export():
    import pylocksfile._native as native

    tree = stub_tree()
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    exported = {n for n in dir(native) if not n.startswith("_")}
    assert exported - names == set()


@pytest.mark.parametrize("name", sorted(set(pkg.__all__) - {"INDEX_END"}))
def test_public_names_have_docstrings(name):
    obj = getattr(pkg, name)
    assert inspect.getdoc(obj), f"{name} has no docstring"
    if inspect.isclass(obj):
        ours = [c for c in obj.__mro__ if c.__module__.startswith("pylocksfile")]
        for member in public_members(obj):
            if not any(member in vars(c) for c in ours):
                continue  # inherited from a built-in base such as OSError
            raw = inspect.getattr_static(obj, member)
            if not (callable(raw) or hasattr(raw, "__get__")):
                continue  # a plain class attribute, described by the class docstring
            assert inspect.getdoc(getattr(obj, member)), f"{name}.{member} has no docstring"


def test_module_docstring():
    assert inspect.getdoc(pkg)
