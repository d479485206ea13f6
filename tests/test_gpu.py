"""GPU paths (`make test-gpu`): implicit's CUDA trainer and nearest-neighbour search on the
GPU, each against the CPU path's known answers. Every test skips without CUDA (CI and the
2-core box have none); /work/shared/GPU.md says how to run them on a GPU machine.

* implicit's GPU trainer passes the trainer contract every backend passes
  (tests/test_als_contract.py), with `info["device"] == "gpu"`;
* its factors fold in consistently: `lake.foldin.fold_in` of a training user's own
  interactions against the GPU-trained item factors gives back the batch user vector;
* FAISS on the GPU (an exact flat index moved there by `lake.vector_index`) returns the
  exact top-k; where no FAISS GPU build runs, PyTorch's exact GPU top-k is the reference the
  CPU serving index is checked against.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_als_contract import ALSContract
from test_foldin_consistency import SETTINGS, foldin_cosines, synthetic_matrix

from lake.config import IndexSettings, TrainSettings
from lake.vector_index import ExactIndex, build_faiss_index, faiss_gpus, recall_at_k
from spark_jobs.als import ImplicitTrainer


def _implicit_cuda() -> bool:
    import implicit.gpu

    return bool(implicit.gpu.HAS_CUDA)


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


pytestmark = pytest.mark.gpu
needs_implicit_cuda = pytest.mark.skipif(not _implicit_cuda(),
                                         reason="implicit built without CUDA or no GPU")
needs_faiss_gpu = pytest.mark.skipif(faiss_gpus() == 0, reason="faiss sees no GPU")
needs_torch_cuda = pytest.mark.skipif(not _torch_cuda(), reason="no PyTorch with CUDA")


def clustered_items(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Item vectors around 50 centres with skewed norms (like ALS item factors), and
    queries near the items (like user vectors)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, dim))
    items = centres[rng.integers(0, 50, n)] + 0.3 * rng.normal(size=(n, dim))
    items *= rng.lognormal(0.0, 0.5, size=(n, 1))
    queries = items[rng.choice(n, 200, replace=False)] + 0.1 * rng.normal(size=(200, dim))
    return items.astype(np.float32), queries.astype(np.float32)


@needs_implicit_cuda
class TestImplicitGPUTrainer(ALSContract):
    """The contract of tests/test_als_contract.py with `use_gpu: true`."""

    backend = "implicit"
    device = "gpu"

    def settings(self, **kw) -> TrainSettings:
        return super().settings(**({"use_gpu": True} | kw))

    def trainer(self, **kw):
        return ImplicitTrainer(self.settings(**kw))

    def test_none_picks_the_gpu_when_implicit_reports_cuda(self) -> None:
        assert ImplicitTrainer(self.settings(use_gpu=None)).use_gpu() is True


@needs_implicit_cuda
def test_gpu_trained_factors_fold_in_to_the_batch_user_vectors() -> None:
    """The GPU fit's item factors come back to the CPU and every user is re-solved exactly
    against them: online fold-in (`lake.foldin`) reproduces each batch user vector."""
    m = synthetic_matrix()
    res = ImplicitTrainer(TrainSettings(backend="implicit", **(SETTINGS | {"use_gpu": True}))
                          ).fit(m)
    assert res.info["device"] == "gpu"
    assert res.item_factors.dtype == np.float32 and res.item_factors.flags.c_contiguous
    assert np.isfinite(res.user_factors).all() and np.isfinite(res.item_factors).all()
    cos = foldin_cosines(m, res)
    assert cos.min() > 0.9999, np.quantile(cos, [0, 0.01, 0.5])
    # The GPU solves the CPU's objective: the same data gives a model of the same quality
    # (not the same numbers: its solver and random start differ).
    cpu = ImplicitTrainer(TrainSettings(backend="implicit", **SETTINGS)).fit(m)
    gpu_seen, cpu_seen = _seen_share(m, res), _seen_share(m, cpu)
    assert abs(gpu_seen - cpu_seen) < 0.05, (gpu_seen, cpu_seen)


def _seen_share(m, res) -> float:
    """Share of each user's top 10 items (all items scored) they interacted with: how well
    the factors reconstruct the training data."""
    scores = res.user_factors @ res.item_factors.T
    top = np.argsort(-scores, axis=1)[:, :10]
    seen = m.csr.toarray() > 0
    return float(np.mean(np.take_along_axis(seen, top, axis=1)))


@needs_faiss_gpu
def test_faiss_flat_index_on_the_gpu_returns_the_exact_top_k(tmp_path) -> None:
    """`index.use_gpu: true` moves the exact flat index to the GPU; it returns the exact
    answer (recall 1.0, the same scores), and saving writes a CPU index that loads back."""
    from lake.vector_index import FaissIndex

    items, queries = clustered_items(20_000, 64, seed=5)
    settings = IndexSettings(exact_max_items=50_000, use_gpu=True)
    gpu = build_faiss_index(items, settings)
    assert "Gpu" in type(gpu.faiss_index).__name__
    exact = ExactIndex(items)
    assert recall_at_k(gpu, exact, queries, 10) == 1.0
    got_s, _ = gpu.search(queries, 10)
    want_s, _ = exact.search(queries, 10)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-4, atol=1e-4)
    gpu.save(tmp_path / "items.faiss")
    cpu = FaissIndex.load(tmp_path / "items.faiss", IndexSettings(use_gpu=False))
    assert "Gpu" not in type(cpu.faiss_index).__name__
    assert recall_at_k(cpu, exact, queries, 10) == 1.0


@needs_torch_cuda
def test_serving_indexes_agree_with_the_exact_gpu_top_k() -> None:
    """PyTorch's exact top-k on the GPU (`topk(q @ Y.T)`, /work/shared/GPU.md) as the
    reference: the CPU flat index gives its answer and the HNSW index (above
    `exact_max_items`) reaches the recall the serving settings promise."""
    import torch

    items, queries = clustered_items(60_000, 64, seed=9)
    y = torch.from_numpy(items).cuda()
    q = torch.from_numpy(queries).cuda()
    ref_s, ref_i = torch.topk(q @ y.T, 10, dim=1)
    ref_ids, ref_scores = ref_i.cpu().numpy(), ref_s.cpu().numpy()

    flat = build_faiss_index(items, IndexSettings(exact_max_items=100_000, use_gpu=False))
    flat_s, flat_i = flat.search(queries, 10)
    np.testing.assert_allclose(flat_s, ref_scores, rtol=1e-4, atol=1e-4)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(flat_i, ref_ids,
                                                               strict=True)]) >= 0.999
    hnsw = build_faiss_index(items, IndexSettings(use_gpu=False))  # default: HNSW above 50k
    assert "HNSW" in type(__import__("faiss").downcast_index(hnsw.faiss_index)).__name__
    _, hnsw_i = hnsw.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(hnsw_i, ref_ids, strict=True)])
    assert recall >= 0.95, recall
