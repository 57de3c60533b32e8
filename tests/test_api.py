"""saft.filter: the user's own data types in, the same types out."""

import numpy as np
import pytest

import saft
from conftest import toy_rows, write_jsonl


def test_filter_returns_the_input_type_with_the_rows_untouched(tmp_path):
    rows = toy_rows(12)
    for r in rows:
        r["extra"] = {"nested": [1, 2]}  # a field the filter does not read stays as it was
    opts = dict(detector="guard", rule="fraction", fraction=0.25, cache_dir=str(tmp_path / "c"))
    out = saft.filter(rows, **opts)
    assert len(out.kept) == 9 and len(out.removed) == 3
    assert all(any(k is r for r in rows) for k in out.kept + out.removed)  # the very same dicts
    assert {r["id"] for r in out.removed} == {s["id"] for s in out.scores if s["removed"]}
    assert all(not r["is_safe"] for r in out.removed)  # the toy harmful rows score highest
    assert out.summary["n_removed"] == 3 and out.summary["input"] == "<list: 12 rows>"

    import pandas as pd

    df = pd.DataFrame(rows).set_index(pd.Index([f"x{i}" for i in range(12)]))
    pout = saft.filter(df, **opts)
    assert isinstance(pout.kept, pd.DataFrame) and list(pout.kept.columns) == list(df.columns)
    assert sorted(pout.removed.index) == sorted(f"x{int(r['id'][1:])}" for r in out.removed)

    import datasets

    ds = datasets.Dataset.from_list([{k: v for k, v in r.items() if k != "extra"} for r in rows])
    dout = saft.filter(ds, **opts)
    assert isinstance(dout.kept, datasets.Dataset) and dout.kept.column_names == ds.column_names
    assert sorted(dout.removed["id"]) == sorted(r["id"] for r in out.removed)

    path = write_jsonl(tmp_path / "d.jsonl", rows)
    fout = saft.filter(path, output_dir=tmp_path / "o", **opts)
    assert fout.kept == [r for r in rows if r["id"] not in {x["id"] for x in out.removed}]
    assert (tmp_path / "o" / "kept.jsonl").exists()
    np.testing.assert_allclose([s["harm_score"] for s in fout.scores], [s["harm_score"] for s in out.scores])


def test_filter_explains_what_it_cannot_take():
    with pytest.raises(TypeError, match="list of dicts, a pandas DataFrame or a datasets.Dataset"):
        saft.filter(42)
    with pytest.raises(TypeError, match="item 1 of the list is a str"):
        saft.filter([{"prompt": "a", "response": "b"}, "oops"])
    with pytest.raises(ValueError, match="Unknown detector"):
        saft.filter([{"prompt": "a", "response": "b"}], detector="nope")
