"""llama.cpp importance matrices (``llama-imatrix``'s GGUF output) moved with their columns.

An importance matrix holds, per weight tensor, the sum of the squared activations entering
each of its input columns (``<tensor>.in_sum2``, shape [matrices, columns]) and how many
calls were summed (``<tensor>.counts``). Requantising a checkpoint in another chart with an
importance matrix computed in the first needs the matrix moved too: the columns of a tensor
whose input is the residual stream (q/k/v/gate/up, the head, the embedding) move with the
gauge's permutation (squares: no sign), every other tensor's stay. Which tensor reads the
residual comes from the model's plan (``--model``: the GGUF file the matrix was computed
for, whose tensor names the matrix uses). The file is rewritten with gguf-py's writer, every
metadata field copied.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GaugefixError
from ..group import SignedPerm
from ..io import atomic_file

IN_SUM2 = ".in_sum2"


def transport_imatrix(src: str | Path, dst: str | Path, gauge: SignedPerm, *,
                      record: dict[str, Any], overwrite: bool = False,
                      model: Any = None) -> dict[str, Any]:
    import gguf

    from ..io import check_regular
    from ..model import open_model
    from ..quant.gguf_file import RECORD_KEY, copy_fields, is_gguf, open_reader

    src, dst = Path(src), Path(dst)
    if model is None:
        raise GaugefixError("imatrix: pass --model, the GGUF file the importance matrix was "
                            "computed for (its tensor names say which columns are residual)")
    check_regular(src, "GGUF importance matrix")
    if not is_gguf(src):
        raise GaugefixError(f"imatrix: {src} is not a GGUF importance matrix (llama-imatrix "
                            "writes one with --output-format gguf, its default; a legacy .dat "
                            "converts with llama-imatrix --in-file X.dat -o X.gguf)")
    m = open_model(model)
    if m.gguf is None:
        raise GaugefixError(f"imatrix: --model {model} is not a GGUF file; the matrix is keyed "
                            "by the GGUF tensor names of the model it was computed for")
    m.family.check_gauge(gauge, m.hidden_size)
    reader = open_reader(src, what="GGUF importance matrix")
    plan, names = m.plan, m.gguf.names
    _check_kind(src, reader)
    unknown = [t.name for t in reader.tensors if t.name.endswith(IN_SUM2)
               and t.name.removesuffix(IN_SUM2) not in names]
    if unknown:
        raise GaugefixError(f"imatrix: {len(unknown)} entries name no tensor of {m.name} "
                            f"({', '.join(unknown[:4])}): computed for another model")
    wrong = []
    for t in reader.tensors:
        if t.name.endswith(IN_SUM2):
            columns = m.shapes[names[t.name.removesuffix(IN_SUM2)]][-1]
            if int(t.shape[0]) != columns:
                wrong.append(f"{t.name} has {int(t.shape[0])} columns, its tensor {columns}")
    if wrong:
        raise GaugefixError(f"imatrix: {src}: {len(wrong)} entries do not fit {m.name} "
                            f"({'; '.join(wrong[:3])}): computed for another model")
    moved = 0
    with atomic_file(dst, overwrite=overwrite, inputs=(src,)) as tmp:
        arch = reader.fields.get("general.architecture")
        writer = gguf.GGUFWriter(tmp, str(arch.contents()) if arch is not None else "imatrix")
        copy_fields(reader, writer)
        writer.add_string(RECORD_KEY, json.dumps(record))
        for t in reader.tensors:
            data = np.asarray(t.data)
            if t.name.endswith(IN_SUM2):
                op = plan[names[t.name.removesuffix(IN_SUM2)]]
                inner = len(m.shapes[names[t.name.removesuffix(IN_SUM2)]]) - 1
                if any(a % (inner + 1) == inner for a in op.axes):  # columns are residual
                    data = gauge.tiled(op.blocks).apply(data, data.ndim - 1, False)
                    moved += 1
            writer.add_tensor(t.name, np.ascontiguousarray(data), raw_dtype=t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"kind": "imatrix", "entries": sum(t.name.endswith(IN_SUM2)
                                             for t in reader.tensors),
            "moved": moved, "record": record}


COUNTS = ".counts"


def _check_kind(src: Path, reader: Any) -> None:
    """Refuse a GGUF file that is not an importance matrix (a model file, a control vector):
    llama-imatrix writes ``general.type = imatrix`` and only ``<tensor>.in_sum2`` /
    ``<tensor>.counts`` pairs."""
    import gguf

    f = reader.fields.get(gguf.Keys.General.TYPE)
    kind = str(f.contents()) if f is not None else None
    other = [t.name for t in reader.tensors if not t.name.endswith((IN_SUM2, COUNTS))]
    sums = [t for t in reader.tensors if t.name.endswith(IN_SUM2)]
    if other or not sums or (kind is not None and kind != "imatrix"):
        arch = reader.fields.get(gguf.Keys.General.ARCHITECTURE)
        what = (f"general.type {kind!r}" if kind not in (None, "imatrix") else
                f"{len(other)} tensors that are not .in_sum2/.counts entries "
                f"({', '.join(other[:3])})" if other else "no .in_sum2 entries")
        arch_text = f", architecture {arch.contents()!r}" if arch is not None else ""
        raise GaugefixError(f"imatrix: {src} is not an importance matrix ({what}{arch_text}); "
                            "llama-imatrix writes general.type 'imatrix' and <tensor>.in_sum2 "
                            "/ <tensor>.counts pairs")
