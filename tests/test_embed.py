"""``sslkit embed``: its files against brute-force numpy (cosine top-K, thresholded pairs), chunking
changes nothing, the files load with numpy and faiss alone, and bad input is one line.

One untrained tiny backbone (no training needed: the search is what is tested, on whatever
features it gives) serves every test; each embed runs in this process (``run_sslkit_here``).
"""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslkit.config import config_from_dict
from sslkit.embed import duplicate_pairs, nearest_neighbors
from sslkit.engine.checkpoint import export_backbone
from sslkit.methods import create_method
from tests.conftest import TINY_RECIPE, run_sslkit_here

K = 5


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    cfg = config_from_dict(TINY_RECIPE)
    path = tmp_path_factory.mktemp("ckpt") / "backbone.safetensors"
    export_backbone(create_method(cfg), cfg, path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, list[tuple[str, str]]]:
    """An image folder of 30 small PNGs (random smooth colours, mixed sizes) in two class folders,
    4 of them byte-for-byte copies of others (one copied twice, one across folders); also returns
    the (original, copy) path pairs."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    originals = []
    for i in range(26):
        folder = root / ("cats" if i % 2 else "dogs")
        folder.mkdir(exist_ok=True)
        coarse = rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((16 + i % 5, 16 + i % 3), Image.BILINEAR)
        path = folder / f"img_{i:02d}.png"
        image.save(path)
        originals.append(path)
    planted = [(originals[3], root / "cats" / "copy_a.png"), (originals[3], root / "dogs" / "copy_b.png"),
               (originals[10], root / "dogs" / "copy_c.png"), (originals[17], root / "cats" / "zz_copy.png")]
    for src, dst in planted:
        shutil.copyfile(src, dst)
    pairs = [(str(a), str(b)) for a, b in planted] + [(str(planted[0][1]), str(planted[1][1]))]  # the two copies
    return root, pairs


def run_embed(backbone: Path, out: Path, *args: str) -> dict:
    done = run_sslkit_here("embed", "--checkpoint", str(backbone), "--out", str(out), *args)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("embedded ")
    return json.loads((out / "embed.json").read_text())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_neighbors_equal_brute_force(backbone, tmp_path):
    out = tmp_path / "emb"
    summary = run_embed(backbone, out, "--data", "synthetic", "--split", "test", "--neighbors", str(K),
                        "data.test_limit=200")
    emb = np.load(out / "embeddings.npy")
    items = (out / "items.txt").read_text().splitlines()
    assert emb.dtype == np.float32 and emb.shape == (200, summary["dim"]) and summary["items"] == 200
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)  # stored L2-normalised
    assert items[123] == "synthetic/test/000123" and len(items) == 200

    # brute force: cosine similarities in float64, self excluded, top K
    e = emb.astype(np.float64)
    sims = e @ e.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")
    lines = read_jsonl(out / "neighbors.jsonl")
    assert [line["row"] for line in lines] == list(range(200))
    exact_rows = 0
    for i, line in enumerate(lines):
        assert line["item"] == items[i]
        got_rows = [n["row"] for n in line["neighbors"]]
        got_sims = np.array([n["similarity"] for n in line["neighbors"]])
        assert len(got_rows) == K and i not in got_rows and len(set(got_rows)) == K
        assert [n["item"] for n in line["neighbors"]] == [items[j] for j in got_rows]
        np.testing.assert_allclose(got_sims, sims[i, order[i, :K]], atol=2e-6)  # the K best similarities
        np.testing.assert_allclose(got_sims, sims[i, got_rows], atol=2e-6)  # ... and these rows have them
        ranked = sims[i, order[i, : K + 1]]
        if np.all(-np.diff(ranked) > 1e-5):  # no near-tie: the rows themselves must agree
            assert got_rows == order[i, :K].tolist()
            exact_rows += 1
    assert exact_rows > 100  # the exact comparison covered most rows


def brute_force_pairs(emb: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    e = emb.astype(np.float64)
    sims = e @ e.T
    i, j = np.nonzero(np.triu(sims >= threshold, k=1))
    # no similarity so close to T that float32 rounding could put it on either side
    assert not np.any(np.abs(np.triu(sims, k=1) - threshold)[np.triu_indices(len(e), 1)] < 1e-5)
    return list(zip(i.tolist(), j.tolist()))


def test_duplicates_equal_brute_force(backbone, photos, tmp_path):
    root, planted = photos
    out = tmp_path / "emb"
    summary = run_embed(backbone, out, "--data", "image_folder", "--data-root", str(root), "--duplicates", "0.9999",
                        "data.image_size=16")
    emb = np.load(out / "embeddings.npy")
    items = (out / "items.txt").read_text().splitlines()
    assert emb.shape[0] == len(items) == 30
    assert sorted(items) == sorted(str(p) for p in root.rglob("*.png"))  # each row names its file
    lines = read_jsonl(out / "duplicates.jsonl")
    got = [tuple(line["rows"]) for line in lines]
    assert got == brute_force_pairs(emb, 0.9999) and summary["duplicate_pairs"] == len(got)
    # the planted copies, found by their file names: exactly them
    assert sorted(tuple(sorted(line["items"])) for line in lines) == sorted(tuple(sorted(p)) for p in planted)
    for line in lines:
        a, b = line["rows"]
        assert a < b and line["items"] == [items[a], items[b]] and line["similarity"] >= 0.9999

    # a lower threshold, between two similarities of unrelated images: the same as brute force
    e = emb.astype(np.float64)
    upper = np.sort((e @ e.T)[np.triu_indices(len(e), 1)])
    gaps = np.diff(upper[len(upper) // 2 : -10])
    t = float(upper[len(upper) // 2 + np.argmax(gaps)] + gaps.max() / 2)  # mid-gap: no pair within gap / 2
    summary = run_embed(backbone, out, "--data", "image_folder", "--data-root", str(root), "--duplicates", repr(t),
                        "data.image_size=16")
    got = [tuple(line["rows"]) for line in read_jsonl(out / "duplicates.jsonl")]
    assert got == brute_force_pairs(emb, t) and len(got) > len(planted)


def test_chunking_changes_nothing(backbone, photos, tmp_path):
    root, _ = photos
    common = ["--data", "image_folder", "--data-root", str(root), "--neighbors", "4", "--duplicates", "0.9999",
              "data.image_size=16", "data.num_workers=0"]
    run_embed(backbone, tmp_path / "one", *common)  # one chunk, one batch of 30
    run_embed(backbone, tmp_path / "tiny", *common, "--chunk-size", "2", "eval.batch_size=7")
    one, tiny = tmp_path / "one", tmp_path / "tiny"
    np.testing.assert_allclose(np.load(tiny / "embeddings.npy"), np.load(one / "embeddings.npy"), atol=1e-6)
    for name in ("items.txt", "duplicates.jsonl"):
        assert (tiny / name).read_text() == (one / name).read_text()
    for a, b in zip(read_jsonl(one / "neighbors.jsonl"), read_jsonl(tiny / "neighbors.jsonl")):
        sims_a = [n["similarity"] for n in a["neighbors"]]
        np.testing.assert_allclose([n["similarity"] for n in b["neighbors"]], sims_a, atol=2e-6)
        if np.all(-np.diff(sims_a) > 1e-5):
            assert [n["row"] for n in a["neighbors"]] == [n["row"] for n in b["neighbors"]]


def test_skipped_files_have_no_row(backbone, photos, tmp_path):
    """Under data.bad_images=skip the loader gives an undecodable file the next image: embed leaves
    its row out (it would pass for that image's duplicate)."""
    root = tmp_path / "photos"
    shutil.copytree(photos[0], root)
    broken = root / "dogs" / "img_04.png"  # its place would get img_06.png, the next file
    broken.write_bytes(b"not a png")
    out = tmp_path / "emb"
    with pytest.warns(UserWarning, match="img_04.png"):
        summary = run_embed(backbone, out, "--data", "image_folder", "--data-root", str(root), "--duplicates",
                            "0.9999", "data.image_size=16", "data.bad_images=skip", "--chunk-size", "4")
    items = (out / "items.txt").read_text().splitlines()
    emb = np.load(out / "embeddings.npy")
    assert summary["skipped"] == [str(broken)] and summary["items"] == len(items) == len(emb) == 29
    assert str(broken) not in items
    reference = np.load(_embed_again(backbone, photos[0], tmp_path / "full") / "embeddings.npy")
    full_items = (tmp_path / "full" / "items.txt").read_text().splitlines()
    rows = [full_items.index(str(photos[0] / Path(item).relative_to(root))) for item in items]
    np.testing.assert_allclose(emb, reference[rows], atol=1e-6)  # every other row is its own image's
    got = [tuple(line["rows"]) for line in read_jsonl(out / "duplicates.jsonl")]
    assert got == brute_force_pairs(emb, 0.9999) and len(got) == 5  # the planted ones, no false pair


def _embed_again(backbone: Path, root: Path, out: Path) -> Path:
    run_embed(backbone, out, "--data", "image_folder", "--data-root", str(root), "data.image_size=16")
    return out


@pytest.mark.parametrize("backend", ["faiss", "torch"])  # torch: what CUDA without faiss-gpu searches with
def test_exact_ties_and_threshold_bounds(backend):
    """Exact duplicates tie with the row itself; the threshold is inclusive; T = -1 takes every pair."""
    emb = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0], [0.6, 0.8]])  # rows 0-3 identical: similarity 1.0 exactly
    for chunk in (1, 4, 100):
        for start, sims, rows in nearest_neighbors(emb, 2, chunk, backend=backend):
            for r, (row_sims, row_rows) in enumerate(zip(sims.tolist(), rows.tolist())):
                i = start + r
                assert i not in row_rows and len(set(row_rows)) == 2
                if i < 4:  # two of its three identical copies
                    assert set(row_rows) < {0, 1, 2, 3} and row_sims == [1.0, 1.0]
        found = [(a, b, s) for i, j, sims, _ in duplicate_pairs(emb, 1.0, chunk)
                 for a, b, s in zip(i.tolist(), j.tolist(), sims.tolist())]
        assert found == [(a, b, 1.0) for a in range(4) for b in range(a + 1, 4)]  # >= T, each pair once
        every = [(a, b) for i, j, _, _ in duplicate_pairs(emb, -1.0, chunk)
                 for a, b in zip(i.tolist(), j.tolist())]
        assert every == [(a, b) for a in range(6) for b in range(a + 1, 6)]
    # more neighbours asked than other rows: all N - 1 of them
    (_, sims, rows), = nearest_neighbors(emb, 50, backend=backend)
    assert rows.shape == (6, 5)
    assert all(sorted(r) == [j for j in range(6) if j != i] for i, r in enumerate(rows.tolist()))


# Runs in a fresh interpreter that cannot import sslkit or torch.
NUMPY_FAISS_ONLY = textwrap.dedent('''
    import importlib.abc, json, sys
    from pathlib import Path

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("sslkit", "torch"):
                raise ImportError(name + " must not be needed to read sslkit embed's files")

    sys.meta_path.insert(0, Refuse())
    import faiss, numpy as np

    out = Path(sys.argv[1])
    emb = np.load(out / "embeddings.npy")
    items = (out / "items.txt").read_text().splitlines()
    index = faiss.read_index(str(out / "index.faiss"))
    sims, rows = index.search(emb, 4)  # each row's own row first, then its 3 nearest
    neighbors = [json.loads(line) for line in (out / "neighbors.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (out / "duplicates.jsonl").read_text().splitlines()]
    print(json.dumps({"shape": list(emb.shape), "dtype": str(emb.dtype), "items": len(items),
                      "ntotal": index.ntotal, "d": index.d, "metric": index.metric_type,
                      "inner_product": faiss.METRIC_INNER_PRODUCT,
                      "stored": bool(np.array_equal(index.reconstruct_n(0, index.ntotal), emb)),
                      "sims": sims.tolist(), "rows": rows.tolist(),
                      "neighbors": len(neighbors), "pairs": len(pairs),
                      "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("sslkit", "torch"))}))
''')


def test_files_load_with_numpy_and_faiss_alone(backbone, photos, tmp_path):
    root, planted = photos
    out = tmp_path / "emb"
    run_embed(backbone, out, "--data", "image_folder", "--data-root", str(root), "--neighbors", "3",
              "--duplicates", "0.9999", "data.image_size=16")
    done = subprocess.run([sys.executable, "-c", NUMPY_FAISS_ONLY, str(out)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    emb = np.load(out / "embeddings.npy")
    assert got["modules"] == [] and got["shape"] == list(emb.shape) and got["dtype"] == "float32"
    assert got["items"] == got["ntotal"] == len(emb) and got["d"] == emb.shape[1]
    assert got["metric"] == got["inner_product"] and got["stored"]
    assert got["neighbors"] == len(emb) and got["pairs"] == len(planted)
    # the index's search is cosine similarity on the stored rows: numpy gives the same numbers
    np.testing.assert_allclose(got["sims"], np.sort(emb @ emb.T, axis=1)[:, ::-1][:, :4], atol=2e-6)


@pytest.mark.parametrize("args, words", [
    (["--checkpoint", "{tmp}/nope", "--data", "synthetic"], ["nope", "backbone.safetensors"]),
    (["--data", "no_such_data"], ["no_such_data"]),
    (["--data", "synthetic", "--neighbors", "0"], ["--neighbors must be at least 1"]),
    (["--data", "synthetic", "--duplicates", "1.5"], ["--duplicates", "[-1, 1]", "1.5"]),
    (["--data", "synthetic", "--duplicates", "-2"], ["--duplicates", "[-1, 1]", "-2"]),
    (["--data", "synthetic", "--chunk-size", "0"], ["--chunk-size must be at least 1"]),
    (["--data", "image_folder", "--data-root", "{tmp}/missing", "data.image_size=16"], ["missing", "not a folder"]),
])
def test_bad_input_is_one_line(backbone, tmp_path, args, words):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--checkpoint" not in args:
        args = ["--checkpoint", str(backbone), *args]
    done = run_sslkit_here("embed", "--out", str(tmp_path / "out"), *args)
    err = done.stderr
    assert done.returncode == 2 and err.startswith("sslkit: error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err
    assert not (tmp_path / "out" / "embeddings.npy").exists()
