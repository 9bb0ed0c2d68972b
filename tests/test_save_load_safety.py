"""``qm.save`` never loses data and ``clq.load`` never runs code from the folder.

Saving replaces only an empty directory or a previous save (``overwrite=True`` for
anything else, never the current directory or a parent of it), and any failure leaves the
previous save where it was with no temporary folder behind. Loading reads only files
``clq.json`` lists under plain names, verifies every digest (``clq.json``'s own body
included), turns malformed JSON into ``LoadError``, and refuses a graph file holding a
string torch.export's reader would evaluate or paste into code, naming the field, before
the reader sees it. The tampering tests recompute every digest, as anyone who can write
the folder can: the grammar check, not the digests, is what stops the payload.
"""

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import clq_compile as clq
import clq_compile.atomic as atomic
from clq_compile.cli import main
from clq_compile.serialize import INDEX_DIGEST, _index_digest
from clq_compile.testing import tiny_pixart

PAYLOAD = "__import__('os').system('touch {}')"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, inputs = tiny_pixart(layers=1)
    qm = clq.quantize(model, [inputs(0), inputs(1)], recipe="rtn", bits="w4a4",
                      measure=False, extra_shapes=None)
    path = qm.save(tmp_path_factory.mktemp("saved") / "model")
    return qm, path, inputs


def _copy(saved, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(saved[1], dst)
    return dst


def _tree(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}


def _reseal(d):
    """Recompute every digest in clq.json, as anyone who can write the folder can."""
    index = json.loads((d / "clq.json").read_text())
    for name in index["files"] if isinstance(index["files"], dict) else []:
        if (d / name).is_file():
            index["files"][name] = hashlib.sha256((d / name).read_bytes()).hexdigest()
    index[INDEX_DIGEST] = _index_digest(index)
    (d / "clq.json").write_text(json.dumps(index))


def _edit_index(d, edit):
    index = json.loads((d / "clq.json").read_text())
    edit(index)
    (d / "clq.json").write_text(json.dumps(index))
    _reseal(d)


def _same_outputs(a, b, inputs):
    with torch.no_grad():
        return torch.equal(a(**inputs(2))[0], b(**inputs(2))[0])


# -- item 4: nothing in a graph file is evaluated -------------------------------------------

def _paths(doc, path=()):
    """(keys, value) for every string in the JSON document."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*path, i))
    elif isinstance(doc, str):
        yield path, doc


MAPS = {"tensor_values", "sym_int_values", "sym_bool_values", "sym_float_values"}


def _kind(path):
    """The field a string sits in, with list positions and map keys left out."""
    return tuple("[]" if isinstance(k, int) else "*" if prev in MAPS else k
                 for prev, k in zip((None, *path), path, strict=False))


def _shown(path):
    """The field as the loader names it: a.b['key'].c[0]."""
    out = ""
    for prev, k in zip((None, *path), path, strict=False):
        out += f"[{k}]" if isinstance(k, int) else f"[{k!r}]" if prev in MAPS else \
            f".{k}" if out else k
    return out


def _sympy_fields(doc):
    """The first string of each kind torch's reader hands to sympy.sympify."""
    first = {}
    for path, _ in _paths(doc):
        if path[-1] == "expr_str":
            first.setdefault(_kind(path), path)
    return list(first.values())


def _set(doc, path, value):
    for k in path[:-1]:
        doc = doc[k]
    doc[path[-1]] = value


def _get(doc, path):
    for k in path:
        doc = doc[k]
    return doc


def _load_refused(d, field, pwned):
    _reseal(d)
    with pytest.raises(clq.LoadError) as e:
        clq.load(d)
    assert field in str(e.value) and "graph_0.json" in str(e.value)
    assert not pwned.exists()


def test_payload_in_any_sympy_string_runs_nothing(saved, tmp_path):
    """Every kind of ``expr_str`` a real saved graph holds (sizes, strides, symbolic ints),
    a range-constraint key and a guard: the payload is appended, the digests are
    recomputed, and loading raises LoadError naming the field without running it (on the
    code before this check, the expr_str and guard payloads created the file)."""
    doc = json.loads((saved[1] / "graph_0.json").read_text())
    fields = _sympy_fields(doc)
    kinds = {_kind(p)[-5:] for p in fields}
    assert {("graph", "sym_int_values", "*", "as_expr", "expr_str"),
            ("*", "sizes", "[]", "as_expr", "expr_str"),
            ("*", "strides", "[]", "as_expr", "expr_str")} <= kinds, kinds
    pwned = tmp_path / "PWNED"
    attack = PAYLOAD.format(pwned)
    for path in fields:
        d = _copy(saved, tmp_path, f"expr{len(list(tmp_path.iterdir()))}")
        g = copy.deepcopy(doc)
        _set(g, path, f"{_get(doc, path)} + 0*({attack})")
        (d / "graph_0.json").write_text(json.dumps(g))
        _load_refused(d, _shown(path), pwned)

    d = _copy(saved, tmp_path, "range")
    g = copy.deepcopy(doc)
    key = next(iter(g["range_constraints"]))
    g["range_constraints"][f"{key} + 0*({attack})"] = g["range_constraints"].pop(key)
    (d / "graph_0.json").write_text(json.dumps(g))
    _load_refused(d, "range_constraints key", pwned)

    d = _copy(saved, tmp_path, "guard")
    g = copy.deepcopy(doc)
    g["guards_code"][0] += f" and ({attack} == 0 or True)"
    (d / "graph_0.json").write_text(json.dumps(g))
    _load_refused(d, "guards_code[0]", pwned)


def _first(doc, field):
    """The path of the first string in ``field`` (or in the list ``field``); "nodes.name"
    is a node's own name."""
    parent, _, field = field.rpartition(".")
    return next(p for p, _ in _paths(doc)
                if field in (p[-1], p[-2] if p[-1] == 0 else None)
                and (not parent or p[-3] == parent))


@pytest.mark.parametrize("field,value", [
    ("nodes.name", "conv2d = {attack}; x"),                # FX pastes node names into code
    ("forward_arg_names", "return_dict={attack}"),         # ... and the forward's arguments
    ("target", "torch.os.system"),                         # the function a node calls
    ("as_string", "tanh' + {attack} + '"),                 # string constants
    ("in_spec", '[1, {{"type": "builtins.dict", "context": "[\\"a\'+{attack}+\'\\"]", '
                '"children_spec": []}}]'),                 # keys pasted into guard code
    ("buffer_name", "../{attack}"),
], ids=["node-name", "forward-arg", "target", "as-string", "in-spec", "buffer-name"])
def test_payload_in_code_bound_strings_is_refused(saved, tmp_path, field, value):
    """Names, targets, string constants and pytree specs end up in Python source FX
    generates or name the function a node calls: each is refused by its grammar."""
    pwned = tmp_path / "PWNED"
    d = _copy(saved, tmp_path)
    g = json.loads((d / "graph_0.json").read_text())
    path = _first(g, field)
    _set(g, path, value.format(attack=PAYLOAD.format(pwned)))
    (d / "graph_0.json").write_text(json.dumps(g))
    _load_refused(d, _shown(path), pwned)


def test_unknown_string_field_is_refused(saved, tmp_path):
    d = _copy(saved, tmp_path)
    g = json.loads((d / "graph_0.json").read_text())
    g["graph_module"]["graph"]["nodes"][0]["metadata"]["eval_me"] = "1"
    (d / "graph_0.json").write_text(json.dumps(g))
    _load_refused(d, "nodes[0].metadata['eval_me']", tmp_path / "PWNED")


# -- item 5: every file read is listed and verified; malformed clq.json is a LoadError -----

def test_edited_index_is_caught(saved, tmp_path):
    d = _copy(saved, tmp_path)
    index = json.loads((d / "clq.json").read_text())
    index["plan"]["recipe"] = "clq"  # another recipe than the graph runs
    (d / "clq.json").write_text(json.dumps(index))
    with pytest.raises(clq.LoadError, match=r"clq.json does not match the digest"):
        clq.load(d)


def test_unlisted_file_is_refused(saved, tmp_path):
    d = _copy(saved, tmp_path)
    _edit_index(d, lambda ix: ix["files"].pop("graph_0.json"))
    with pytest.raises(clq.LoadError, match=r"graph_0.json is read on load but not listed"):
        clq.load(d)


@pytest.mark.parametrize("name", ["../x.json", "sub/graph_0.json", "..", ".hidden"])
def test_file_outside_the_folder_is_refused(saved, tmp_path, name):
    d = _copy(saved, tmp_path)
    shutil.copy(d / "graph_0.json", tmp_path / "x.json")

    def edit(ix):
        ix["graphs"][0]["file"] = name
        ix["files"][name] = ix["files"]["graph_0.json"]

    _edit_index(d, edit)
    with pytest.raises(clq.LoadError, match=r"graphs\[0\]\.file|files entry") as e:
        clq.load(d)
    assert repr(name) in str(e.value)


@pytest.mark.parametrize("edit,field", [
    (lambda ix: ix["plan"].__setitem__("layers", "oops"), "plan.layers is a str"),
    (lambda ix: ix.__setitem__("files", ["weights.safetensors"]), "files is a list"),
    (lambda ix: ix.__setitem__("graphs", {"0": 1}), "graphs is a dict"),
    (lambda ix: ix["graphs"].__setitem__(0, "graph_0.json"), "graphs[0] is a str"),
], ids=["plan-layers-str", "files-list", "graphs-dict", "graph-entry-str"])
def test_malformed_index_is_a_load_error(saved, tmp_path, edit, field):
    d = _copy(saved, tmp_path)
    _edit_index(d, edit)
    with pytest.raises(clq.LoadError) as e:
        clq.load(d)
    assert "clq.json is corrupt" in str(e.value) and field in str(e.value)


def test_deeply_nested_index_is_a_load_error(saved, tmp_path):
    d = _copy(saved, tmp_path)
    depth = 100_000
    (d / "clq.json").write_text('{"format": "clq_compile.quantized_model", "plan": '
                                + "[" * depth + "]" * depth + "}")
    with pytest.raises(clq.LoadError, match="clq.json is corrupt.*nested deeper"):
        clq.load(d)


@pytest.mark.parametrize("version,says", [
    (0, "format version 0 was never written"), (-3, "format version -3 was never written"),
    ("1", "'1' is a str, not an integer"), (True, "True is a bool, not an integer"),
    (1, "format version 1, whose clq.json carries no digest"),
])
def test_unknown_format_version_is_refused(saved, tmp_path, version, says):
    d = _copy(saved, tmp_path)
    _edit_index(d, lambda ix: ix.__setitem__("version", version))
    with pytest.raises(clq.LoadError) as e:
        clq.load(d)
    assert says in str(e.value) and "upgrade" not in str(e.value)


@pytest.mark.parametrize("tamper", ["plan-layers-str", "deep"])
def test_cli_inspect_of_a_tampered_folder_prints_one_line(saved, tmp_path, capsys, tamper):
    d = _copy(saved, tmp_path)
    if tamper == "deep":
        (d / "clq.json").write_text("[" * 100_000 + "]" * 100_000)
    else:
        _edit_index(d, lambda ix: ix["plan"].__setitem__("layers", "oops"))
    assert main(["inspect", str(d)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "clq.json" in err


# -- items 1 and 2: saving never loses data -------------------------------------------------

@pytest.mark.parametrize("where", [".", ""])
def test_save_to_the_current_directory_is_refused(saved, tmp_path, monkeypatch, where):
    d = _copy(saved, tmp_path)
    before = _tree(tmp_path)
    monkeypatch.chdir(d)
    for overwrite in (False, True):
        with pytest.raises(clq.SaveError, match=r"'\.'.*current directory"):
            saved[0].save(where, overwrite=overwrite)
    assert _tree(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["copy"]


def test_save_to_a_parent_of_the_current_directory_is_refused(saved, tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path / "mine")
    with pytest.raises(clq.SaveError, match="current directory or a parent"):
        saved[0].save(tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_save_onto_user_files_is_refused_unless_overwrite(saved, tmp_path):
    d = tmp_path / "my_project"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    with pytest.raises(clq.SaveError, match=r"my_project: .*not a previous save.*overwrite"):
        saved[0].save(d)
    assert _tree(d) == {"notes.txt": b"mine"}
    saved[0].save(d, overwrite=True)
    assert not (d / "notes.txt").exists()
    assert _same_outputs(clq.load(d), saved[0], saved[2])


def test_save_into_an_empty_directory(saved, tmp_path):
    (tmp_path / "empty").mkdir()
    saved[0].save(tmp_path / "empty")
    assert (tmp_path / "empty" / "clq.json").is_file()


def _failing_replace(monkeypatch, fail_calls):
    """os.replace as clq_compile.atomic sees it, failing on the given calls (1-based);
    the one-step exchange is made unavailable so the two-rename path runs."""
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) in fail_calls:
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False, raising=False)
    monkeypatch.setattr(atomic.os, "replace", replace)
    return calls


def test_failed_second_rename_puts_the_previous_save_back(saved, tmp_path, monkeypatch):
    d = _copy(saved, tmp_path)
    before = _tree(d)
    calls = _failing_replace(monkeypatch, {2})
    with pytest.raises(clq.SaveError, match=r"could not write .*copy.*Input/output"):
        saved[0].save(d)
    assert len(calls) == 3  # aside, in (failed), back
    assert _tree(d) == before and sorted(os.listdir(tmp_path)) == ["copy"]
    monkeypatch.undo()
    assert _same_outputs(clq.load(d), saved[0], saved[2])


def test_failed_put_back_keeps_the_previous_save_and_names_it(tmp_path, monkeypatch):
    d = tmp_path / "m"
    d.mkdir()
    (d / "clq.json").write_text("previous")
    _failing_replace(monkeypatch, {2, 3})
    with pytest.raises(clq.SaveError, match=r"nor put the previous version back: it is in") as e:
        with atomic.atomic_dir(d, replaceable=lambda p: True) as tmp:
            (tmp / "clq.json").write_text("new")
    kept = Path(str(e.value).rsplit("it is in ", 1)[1])
    assert (kept / "clq.json").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == [kept.parent.name]


def test_failed_exchange_leaves_the_previous_save(tmp_path, monkeypatch):
    d = tmp_path / "m"
    d.mkdir()
    (d / "clq.json").write_text("previous")

    def broken(a, b):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(atomic, "_exchange", broken)
    with pytest.raises(clq.SaveError, match="Input/output"):
        with atomic.atomic_dir(d, replaceable=lambda p: True) as tmp:
            (tmp / "clq.json").write_text("new")
    assert _tree(d) == {"clq.json": b"previous"} and os.listdir(tmp_path) == ["m"]


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_replace_leaves_no_temporary(tmp_path, monkeypatch, exchange):
    d = tmp_path / "m"
    d.mkdir()
    (d / "clq.json").write_text("previous")
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    with atomic.atomic_dir(d, replaceable=lambda p: True) as tmp:
        (tmp / "clq.json").write_text("new")
    assert _tree(d) == {"clq.json": b"new"} and os.listdir(tmp_path) == ["m"]
