"""Model-sized buffers are used again only when nobody else can see them, and in-process sites
read a shared global model copy-on-write: what one site writes reaches neither the server nor
another site, and a set still mapped by a site is never overwritten."""

from __future__ import annotations

import pytest
import torch

from flkit import shared_model
from flkit.shared_model import SharedModel, shared_model_of
from flkit.tensor_reuse import BufferPool, copy_into_pool, reuse_supported

MODEL = {"w": torch.arange(3000, dtype=torch.float32).reshape(30, 100), "b": torch.ones(7, dtype=torch.float64),
         "n": torch.tensor(3, dtype=torch.int64), "empty": torch.zeros(0)}


def test_this_torch_lets_the_pool_see_other_holders():
    assert reuse_supported(), "torch._C._storage_Use_Count is gone: buffers are never reused (slow, not wrong)"


def test_a_set_is_reused_once_every_alias_is_dropped():
    pool = BufferPool()
    first = copy_into_pool(pool, MODEL)
    ptr = first["w"].data_ptr()
    del first
    second = copy_into_pool(pool, MODEL)
    assert (pool.allocated, pool.reused) == (1, 1) and second["w"].data_ptr() == ptr
    assert all(torch.equal(second[k], MODEL[k]) for k in MODEL)
    assert second["w"]._base is None  # an alias, not a view that leads back to the pool's own tensor


@pytest.mark.parametrize("holder", ["alias", "view", "numpy", "autograd"])
def test_a_set_anyone_still_holds_is_never_overwritten(holder):
    pool = BufferPool()
    first = copy_into_pool(pool, MODEL)
    if holder == "alias":
        kept = first["w"]
    elif holder == "view":
        kept = first["w"][3]
    elif holder == "numpy":
        kept = first["w"].numpy()
    else:
        kept = first["w"].requires_grad_() * 2  # the graph holds the input
    before = first["w"].detach().clone()
    del first
    second = copy_into_pool(pool, {k: v + 1 if v.is_floating_point() else v for k, v in MODEL.items()})
    assert pool.reused == 0 and pool.allocated == 2
    assert kept is not None
    assert torch.equal(pool._sets[-1].buffers["w"], second["w"]) and not torch.equal(second["w"], before)


def test_a_set_shaped_for_another_model_is_not_reused():
    pool = BufferPool()
    first = copy_into_pool(pool, MODEL)
    del first
    other = copy_into_pool(pool, {"w": torch.zeros(30, 100)})
    assert pool.reused == 0 and other.keys() == {"w"}


@pytest.mark.skipif(not shared_model.supported(), reason="memfd is Linux only")
def test_private_views_are_copy_on_write():
    model = SharedModel(MODEL)
    for name, tensor in MODEL.items():
        model.tensors[name].copy_(tensor)
    site_a, site_b = model.private_view(), model.private_view()
    site_a["w"].fill_(-1)
    site_a["b"].add_(5)
    assert torch.equal(model.tensors["w"], MODEL["w"]) and torch.equal(site_b["w"], MODEL["w"])
    assert torch.equal(site_b["b"], MODEL["b"]) and torch.equal(site_a["b"], MODEL["b"] + 5)
    assert all(site_b[k].shape == v.shape and site_b[k].dtype == v.dtype for k, v in MODEL.items())


@pytest.mark.skipif(not shared_model.supported(), reason="memfd is Linux only")
def test_a_shared_set_a_site_still_maps_is_never_overwritten():
    pool = BufferPool(depth=1, shared=True)
    global_0 = copy_into_pool(pool, MODEL)
    owner = shared_model_of(global_0)
    assert owner is not None
    site_view = owner.private_view()
    del global_0
    global_1 = copy_into_pool(pool, {k: v + 1 if v.is_floating_point() else v for k, v in MODEL.items()})
    assert pool.reused == 0  # the site still maps round 0's set
    assert torch.equal(site_view["w"], MODEL["w"]) and torch.equal(global_1["w"], MODEL["w"] + 1)
    del site_view, global_1
    copy_into_pool(pool, MODEL)
    assert pool.reused == 1


@pytest.mark.skipif(not shared_model.supported(), reason="memfd is Linux only")
def test_only_tensors_of_a_shared_set_are_recognised():
    pool = BufferPool(shared=True)
    shared = copy_into_pool(pool, MODEL)
    assert shared_model_of(shared) is not None
    assert shared_model_of({k: v.clone() for k, v in shared.items()}) is None
    assert shared_model_of({"w": shared["w"]}) is None  # not the whole set
    assert shared_model_of(MODEL) is None


@pytest.mark.skipif(not shared_model.supported(), reason="memfd is Linux only")
def test_a_set_kept_in_a_folder_is_a_safetensors_file_that_goes_with_the_set(tmp_path):
    """Sites in other processes read the global model by file name: the file is plain safetensors
    (safetensors itself and flkit's checked parser read it), and it goes when the set goes."""
    from safetensors.torch import load_file

    from flkit.wire.shm_files import map_params_file

    pool = BufferPool(depth=1, shared=True)
    pool.keep_in(tmp_path)
    params = copy_into_pool(pool, MODEL)
    owner = shared_model_of(params)
    assert owner is not None and owner.path is not None and owner.path.parent == tmp_path
    assert owner.path.stat().st_mode & 0o777 == 0o600
    for read in (load_file(owner.path), map_params_file(owner.path, owner.size)):
        assert read.keys() == MODEL.keys() and all(torch.equal(read[k], MODEL[k]) for k in MODEL)
    path = owner.path
    del owner, params, read
    pool.clear()
    assert not path.exists()


@pytest.mark.skipif(not shared_model.supported(), reason="memfd is Linux only")
def test_a_set_given_to_another_process_is_reused_only_once_released(tmp_path):
    pool = BufferPool(depth=1, shared=True)
    pool.keep_in(tmp_path)
    first = copy_into_pool(pool, MODEL)
    owner = shared_model_of(first)
    assert owner is not None
    owner.hold("session-a")
    owner.hold("session-b")
    del first
    copy_into_pool(pool, MODEL)  # a site may still map the file: a new set
    assert pool.reused == 0 and pool.allocated == 2
    second = shared_model_of(copy_into_pool(pool, MODEL))  # the set made last is free: reused
    assert second is not None and second is not owner and pool.reused == 1
    pool = BufferPool(depth=1, shared=True)
    pool.keep_in(tmp_path)
    held = copy_into_pool(pool, MODEL)
    model = shared_model_of(held)
    assert model is not None
    model.hold("session-a")
    del held
    model.release("session-a")
    copy_into_pool(pool, MODEL)
    assert pool.reused == 1


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
@pytest.mark.parametrize("holder", ["untyped", "typed"])
def test_a_held_storage_object_keeps_its_buffer(holder):
    pool = BufferPool()
    first = copy_into_pool(pool, MODEL)
    kept = first["w"].untyped_storage() if holder == "untyped" else first["w"].storage()
    del first
    copy_into_pool(pool, MODEL)
    assert pool.reused == 0 and kept is not None


@pytest.mark.skipif(not shared_model.supported(), reason="memfd is Linux only")
def test_a_site_whose_view_cannot_be_mapped_gets_a_copy(monkeypatch):
    from flkit.messages import Task
    from flkit.transport.memory import _own_copy

    def no_room(self):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr("flkit.transport.memory.PRIVATE_VIEW_MIN_BYTES", 0)  # MODEL is small: map it anyway
    monkeypatch.setattr(SharedModel, "private_view", no_room)
    server_side = BufferPool(shared=True)
    task = Task("t1", "train", 0, 1, "FULL", {}, copy_into_pool(server_side, MODEL))
    got = _own_copy(task, BufferPool()).params
    assert got is not None and all(torch.equal(got[k], MODEL[k]) for k in MODEL)
    got["w"].fill_(-1)
    assert torch.equal(task.params["w"], MODEL["w"])


@pytest.mark.skipif(not shared_model.supported(), reason="memfd is Linux only")
def test_in_process_sites_map_a_large_global_model_and_copy_a_small_one(monkeypatch):
    """A copy-on-write view costs an mmap and a tensor per parameter each task; below 1 MiB a copy into
    the transport's reused buffers is cheaper. Either way the site's tensors are its own."""
    from flkit.messages import Task
    from flkit.transport import memory

    views = []
    real_view = SharedModel.private_view
    monkeypatch.setattr(SharedModel, "private_view", lambda self: views.append(1) or real_view(self))
    server_side = BufferPool(shared=True)
    task = Task("t1", "train", 0, 1, "FULL", {}, copy_into_pool(server_side, MODEL))
    for threshold, mapped in ((0, 1), (1 << 40, 0)):
        monkeypatch.setattr(memory, "PRIVATE_VIEW_MIN_BYTES", threshold)
        views.clear()
        got = memory._own_copy(task, BufferPool()).params
        assert len(views) == mapped, threshold
        assert got is not None and all(torch.equal(got[k], MODEL[k]) for k in MODEL)
        got["w"].fill_(-1)
        assert torch.equal(task.params["w"], MODEL["w"]), threshold


def _open_memfds() -> int:
    import os

    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:flkit")
        except OSError:
            pass
    return count


@pytest.mark.skipif(not shared_model.supported(), reason="memfd is Linux only")
def test_in_process_jobs_leave_no_shared_memory_behind(tmp_path):
    """Each job keeps its global models in memfds; when the job is over they are gone, however many
    rounds and jobs ran (a real simulator job, in-process sites)."""
    import gc

    from flkit.job import FedAvgJob, ScriptRunner

    from conftest import REPO

    gc.collect()
    before = _open_memfds()
    for job_no in range(2):
        job = FedAvgJob(name=f"memfd{job_no}", initial_model=torch.nn.Linear(300, 300), n_clients=2,
                        num_rounds=5, final_validation=False)
        job.to_clients(ScriptRunner(script=str(REPO / "bench" / "noop_site.py")))
        result = job.simulator_run(tmp_path / f"ws{job_no}", quiet=True)
        assert result.ok, result.reason
        del job, result
        gc.collect()
        assert _open_memfds() <= before
