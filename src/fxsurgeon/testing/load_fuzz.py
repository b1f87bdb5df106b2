"""A fuzzer for :func:`fxsurgeon.load`: real saved conversions, mutated as an attacker or a bad disk would.

Each mutated file must be refused with a :class:`~fxsurgeon.SurgeryError` or load cleanly; no other exception
may escape, and nothing named in the file may run. The factories, leaf modules and functions the mutations
plant are *canaries*: each would create a file in a canary folder if it were imported or called (``touch`` by
``os:system`` / ``subprocess:run``, a copy by ``shutil:copyfile``, a module whose import writes a file), so an
empty canary folder after the run proves that none was. Used by ``tests/test_io_load_safety.py`` (a seeded
slice) and ``benchmarks/fuzz.py --saved-files`` (the long run).

>>> import tempfile, random
>>> from pathlib import Path
>>> work = Path(tempfile.mkdtemp())
>>> bases = make_base_files(work, kinds=("fuzznet",))
>>> fuzzer = LoadFuzzer(bases, work)
>>> outcome = fuzzer.run_one(random.Random(0), work / "m.safetensors")
>>> outcome["outcome"] in ("refused", "loaded")
True
>>> fuzzer.canaries()
[]
"""

from __future__ import annotations

import copy
import json
import random
import sys
import textwrap
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import SurgeryError

__all__ = ["CANARY_MODULE", "LoadFuzzer", "make_base_files"]

CANARY_MODULE = "fxsurgeon_load_fuzz_canary"


def make_base_files(folder: Path, kinds: Sequence[str] = ("resnet20", "fuzznet", "timm")) -> list[Path]:
    """Real saved conversions to mutate: CIFAR ResNet-20, two FuzzNets, timm's ``test_resnet`` (when timm is)."""
    from ..convert import convert
    from ..io import save
    from .fuzz import FuzzNet, RandomDraw, generate_spec

    torch.manual_seed(0)
    out = []
    if "resnet20" in kinds:
        from ..models import resnet20

        path = folder / "base_resnet20.safetensors"
        save(convert(resnet20(), source=resnet20, example_inputs=torch.randn(1, 3, 32, 32)), path)
        out.append(path)
    if "fuzznet" in kinds:
        for seed in (3, 11):
            spec = generate_spec(RandomDraw(random.Random(seed)), max_ops=6)
            x = torch.randn(1, *spec["input"])
            path = folder / f"base_fuzznet{seed}.safetensors"
            small = convert(FuzzNet(spec), example_inputs=x,
                                      source={"factory": "fxsurgeon.testing.fuzz:FuzzNet", "kwargs": {"spec": spec}})
            save(small, path)
            out.append(path)
    if "timm" in kinds:
        try:
            import timm
        except ImportError:
            timm = None
        if timm is not None and timm.is_model("test_resnet"):
            model = timm.create_model("test_resnet")
            path = folder / "base_timm_test_resnet.safetensors"
            save(convert(model, example_inputs=torch.randn(1, 3, 64, 64)), path)
            out.append(path)
    return out


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["fxsurgeon"])
    return meta, load_file(str(path))


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys / indices) into a JSON value, the root excluded."""
    out = []
    stack = [(value, prefix)]
    while stack:
        v, p = stack.pop()
        items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
        for k, x in items:
            out.append((*p, k))
            stack.append((x, (*p, k)))
    return out


def _get(value: Any, path: tuple) -> Any:
    for k in path:
        value = value[k]
    return value


class LoadFuzzer:
    """Mutates saved files and loads them; counts outcomes; canaries prove that no named code ran."""

    def __init__(self, bases: Sequence[Path], work: Path) -> None:
        self.bases = [_read(Path(p)) for p in bases]
        self.canary_dir = Path(work) / "canaries"
        self.canary_dir.mkdir(parents=True, exist_ok=True)
        mod_dir = Path(work) / "canary_modules"
        mod_dir.mkdir(exist_ok=True)
        flag = self.canary_dir / "imported"
        (mod_dir / f"{CANARY_MODULE}.py").write_text(textwrap.dedent(f"""
            import torch.nn as nn
            open({str(flag)!r}, "w").close()

            def build(**kwargs):
                open({str(self.canary_dir / "called")!r}, "w").close()
                return nn.Identity()

            class Leaf(nn.Module):
                pass
        """))
        if str(mod_dir) not in sys.path:
            sys.path.append(str(mod_dir))  # importable, so only the loader's refusal keeps it from running
        self.mutators: list[tuple[str, Callable[[random.Random, dict, dict], Any]]] = [
            ("factory", self._factory), ("tracing_names", self._tracing_names), ("kwargs", self._kwargs),
            ("example_shape", self._example_shape), ("format_version", self._format_version),
            ("nesting", self._nesting), ("json_value", self._json_value), ("json_delete", self._json_delete),
            ("tensor", self._tensor), ("rewrite", self._rewrite), ("tied", self._tied), ("text", None),
        ]

    # ------------------------------------------------------------------------------------- mutations

    def _canary(self, name: str) -> str:
        return str(self.canary_dir / name)

    def _canary_sources(self) -> list[dict[str, Any]]:
        c = self._canary
        return [
            {"factory": "os:system", "kwargs": {"command": f"touch {c('os_system')}"}},
            {"factory": "subprocess:run", "kwargs": {"args": ["touch", c("subprocess")]}},
            {"factory": "subprocess:Popen", "kwargs": {"args": ["touch", c("popen")]}},
            {"factory": "shutil:copyfile", "kwargs": {"src": __file__, "dst": c("copyfile")}},
            {"factory": "builtins:exec", "kwargs": {}},
            {"factory": "pathlib:Path.touch", "kwargs": {"self": c("touch")}},
            {"factory": f"{CANARY_MODULE}:build", "kwargs": {}},
            {"factory": f"{CANARY_MODULE}:*", "kwargs": {}},
            {"factory": "fxsurgeon.models:os.system", "kwargs": {"command": f"touch {c('through')}"}},
            {"factory": "fxsurgeon.models.cifar_resnet:torch.save", "kwargs": {"obj": 1, "f": c("torch_save")}},
            {"factory": "torchvision.models:_api.os.system", "kwargs": {"command": f"touch {c('tv')}"}},
            {"factory": "os..path:join", "kwargs": {}},
            {"factory": "fxsurgeon.testing.fuzz:os.system", "kwargs": {"command": f"touch {c('fuzz')}"}},
            {"timm": "resnet18", "kwargs": {"checkpoint_path": c("ckpt")}},
            {"timm": f"{CANARY_MODULE}:build", "kwargs": {}},
        ]

    def _factory(self, rng: random.Random, meta: dict, tensors: dict) -> str:
        src = rng.choice(self._canary_sources())
        where = rng.choice(["source", "record"])
        if where == "record":
            meta["record"]["source"] = src
        else:
            meta["source"] = copy.deepcopy(src)
        return f"{where}={src.get('factory', src.get('timm'))}"

    def _tracing_names(self, rng: random.Random, meta: dict, tensors: dict) -> str:
        key = rng.choice(["leaf_modules", "autowrap_functions"])
        name = rng.choice([f"{CANARY_MODULE}:Leaf", f"{CANARY_MODULE}:build", "os:system", "builtins:eval",
                           "subprocess:run", "torch:load", "torch.nn:Module", "x:y", ":", 3])
        meta["record"].setdefault("tracing", {})[key] = [name]
        return f"{key}={name}"

    def _kwargs(self, rng: random.Random, meta: dict, tensors: dict) -> str:
        kwargs = meta["source"].setdefault("kwargs", {})
        key = rng.choice([*kwargs, "num_classes", "width", "in_chans", "depth", "spec", "pretrained", "weights",
                          "drop_rate", "img_size"])
        value = rng.choice([10**rng.randint(3, 12), -rng.randint(1, 10**6), True, False, None, 0.5, "x" * 5000,
                            [10**9] * 3, {"a": 1}, rng.randint(0, 64)])
        if key == "spec" and isinstance(kwargs.get("spec"), dict) and rng.random() < 0.7:
            spec = kwargs["spec"]
            paths = [p for p in _paths(spec) if isinstance(_get(spec, p), int)]
            if paths:
                p = rng.choice(paths)
                _get(spec, p[:-1])[p[-1]] = value
                return f"spec{list(p)}={value!r:.40}"
        kwargs[key] = value
        return f"kwargs[{key}]={value!r:.40}"

    def _example_shape(self, rng: random.Random, meta: dict, tensors: dict) -> str:
        inputs = meta["record"].setdefault("tracing", {}).setdefault("example_inputs", [{"shape": [1], "dtype": "float32"}])
        if not inputs:
            inputs.append({"shape": [1], "dtype": "float32"})
        spec = inputs[0]
        choice = rng.randrange(5)
        if choice == 0:
            spec["shape"] = [rng.choice([1, 2, 10**5, 10**9]) for _ in range(rng.randint(0, 12))]
        elif choice == 1:
            spec["shape"] = rng.choice([[-1, 3], [True, 3], [1.5], "1,3", None, [[1]], [2**63]])
        elif choice == 2:
            spec["dtype"] = rng.choice(["load", "save", "float32", "int8", "complex128", "qint8", "", 3, None])
        elif choice == 3:
            spec.clear()
            spec.update(rng.choice([{"value": [1, 2]}, {"type": "os.system"}, {"shape": [1, 3, 8, 8]}, {}]))
        else:
            inputs.extend([{"shape": [4096, 4096], "dtype": "float32"}] * rng.randint(1, 40))
        return f"example_inputs={json.dumps(inputs)[:80]}"

    def _format_version(self, rng: random.Random, meta: dict, tensors: dict) -> str:
        v = rng.choice([True, False, 0, -1, 2, 10**20, 1.0, "1", None, [1], {"v": 1}])
        meta["format_version"] = v
        return f"format_version={v!r}"

    def _nesting(self, rng: random.Random, meta: dict, tensors: dict) -> str:
        depth = rng.choice([50, 200, 1000, 5000, 50_000])
        opens = [rng.choice(["[", '{"k": ']) for _ in range(depth)]
        # spliced into the JSON text by mutate(): json.dumps itself cannot write what is this deep
        self._nests.append("".join(opens) + "1" + "".join("]" if o == "[" else "}" for o in reversed(opens)))
        paths = _paths(meta)
        p = rng.choice(paths)
        _get(meta, p[:-1])[p[-1]] = f"@@nest{len(self._nests) - 1}@@"
        return f"nested depth {depth} at {list(p)[:6]}"

    def _json_value(self, rng: random.Random, meta: dict, tensors: dict) -> str:
        p = rng.choice(_paths(meta))
        value = rng.choice([None, True, 0, -1, 10**30, 1.5, float("nan"), "", "x", [], {}, [None], {"": None}])
        _get(meta, p[:-1])[p[-1]] = value
        return f"{list(p)[:6]}={value!r}"

    def _json_delete(self, rng: random.Random, meta: dict, tensors: dict) -> str:
        p = rng.choice(_paths(meta))
        parent = _get(meta, p[:-1])
        del parent[p[-1]]
        return f"del {list(p)[:6]}"

    def _tensor(self, rng: random.Random, meta: dict, tensors: dict) -> str:
        key = rng.choice(sorted(tensors))
        t = tensors[key]
        choice = rng.randrange(5)
        if choice == 0:
            del tensors[key]
            return f"drop tensor {key}"
        if choice == 1:
            tensors[key] = torch.zeros(t.numel() + rng.randint(1, 5))
            return f"reshape tensor {key}"
        if choice == 2:
            tensors[key] = t.to(rng.choice([torch.int8, torch.float16, torch.bool, torch.int64]))
            return f"dtype tensor {key}"
        if choice == 3:
            tensors[f"extra.{rng.randint(0, 99)}"] = torch.zeros(3)
            return "extra tensor"
        tensors[key] = torch.zeros(*(s + 1 for s in t.shape)) if t.dim() else torch.zeros(2)
        return f"grow tensor {key}"

    def _rewrite(self, rng: random.Random, meta: dict, tensors: dict) -> str:
        rec = meta["record"]
        choice = rng.randrange(4)
        if choice == 0 and rec.get("rewrites"):
            r = rng.choice(rec["rewrites"])
            r.setdefault("details", {})["rank"] = rng.choice([0, -1, 10**9, 1.5, True, "2", None, 2])
            return "rewrite rank"
        if choice == 1 and rec.get("rewrites"):
            r = rng.choice(rec["rewrites"])
            r["target"] = rng.choice(["", "nope", "layer1.0", "..", r["target"] + ".x"])
            return "rewrite target"
        if choice == 2:
            rec["options"][rng.choice(["nope", "separable", "conv_head"])] = rng.choice([{}, {"calibration": "synthetic"},
                                                                                     {"multiplier": 10**6}, {"x": 1}])
            return "pass options"
        if meta.get("structure"):
            i = rng.randrange(len(meta["structure"]))
            meta["structure"][i] = meta["structure"][i][::-1]
        return "structure line"

    def _tied(self, rng: random.Random, meta: dict, tensors: dict) -> str:
        keys = sorted(tensors)
        meta["tied"] = rng.choice([{rng.choice(keys): rng.choice(keys)}, {"new.alias": "missing"},
                                   {"x": rng.choice(keys)}, [1], {"a": 3}])
        return f"tied={meta['tied']!r:.60}"

    # ------------------------------------------------------------------------------------- running

    def mutate(self, rng: random.Random, path: Path) -> list[str]:
        """Write one mutated file to ``path``; returns the mutations applied."""
        from safetensors.torch import save_file

        meta, tensors = self.bases[rng.randrange(len(self.bases))]
        meta, tensors = copy.deepcopy(meta), dict(tensors)
        done = []
        text = None
        self._nests: list[str] = []
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            name, fn = rng.choice(self.mutators)
            if fn is None:
                text = json.dumps(meta)
                cut = rng.randrange(len(text))
                text = rng.choice([text[:cut], text[:cut] + "\x00" + text[cut + 1:], text.replace('"', "'", 1)])
                done.append("text")
                break
            try:
                done.append(f"{name}: {fn(rng, meta, tensors)}")
            except (IndexError, KeyError, TypeError, AttributeError):
                done.append(f"{name}: not applicable")
        if text is None:
            text = json.dumps(meta) if rng.random() < 0.995 else "x" * (33 * 2**20)
        for i, nest in enumerate(self._nests):
            text = text.replace(f'"@@nest{i}@@"', nest)
        if not tensors:
            tensors = {"x": torch.zeros(1)}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
                  metadata={"format": "pt", "fxsurgeon": text})
        return done

    def canaries(self) -> list[str]:
        """Files the canaries created (none unless code named in a file ran), and the canary module if imported."""
        found = sorted(p.name for p in self.canary_dir.iterdir())
        return found + ([f"module {CANARY_MODULE} imported"] if CANARY_MODULE in sys.modules else [])

    def run_one(self, rng: random.Random, path: Path) -> dict[str, Any]:
        """Mutate, load, classify: ``refused`` (SurgeryError), ``loaded``, or ``CRASH`` (anything else)."""
        from ..io import load

        mutations = self.mutate(rng, path)
        try:
            load(path)
            outcome: dict[str, Any] = {"outcome": "loaded"}
        except SurgeryError as exc:
            outcome = {"outcome": "refused", "message": str(exc).splitlines()[0][:300],
                       "multiline": "\n" in str(exc)}
        except RecursionError as exc:  # counted as a crash: a RecursionError must not escape either
            outcome = {"outcome": "CRASH", "error": f"RecursionError: {str(exc)[:200]}"}
        except Exception as exc:
            outcome = {"outcome": "CRASH", "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                       "traceback": traceback.format_exc(limit=8)}
        outcome["mutations"] = mutations
        return outcome
