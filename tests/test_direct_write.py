"""The server's model files written with O_DIRECT are plain safetensors files, and where the file
system refuses O_DIRECT the same file is written the usual way."""

from __future__ import annotations

import logging

import safetensors.torch
import torch
from safetensors import safe_open

from flkit.server import direct_write, persistor
from flkit.server.direct_write import DirectWriter, DirectWriteUnsupported
from flkit.server.persistor import Persistor, save_params

PARAMS = {"big": torch.randn(1000, 1037), "half": torch.randn(5, dtype=torch.float16),
          "steps": torch.tensor(7, dtype=torch.int64), "flag": torch.tensor([True, False]), "none": torch.zeros(0, 3)}


def _same(path) -> None:
    back = safetensors.torch.load_file(str(path))
    assert back.keys() == PARAMS.keys()
    for name, tensor in PARAMS.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_a_direct_write_is_a_safetensors_file_of_the_exact_size(tmp_path):
    writer = DirectWriter(bounce_bytes=1 << 20)  # several bounce buffers, a padded last block
    path = tmp_path / "m.safetensors"
    save_params(path, PARAMS, {"round": 4}, writer)
    _same(path)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"round": "4"}
    reference = tmp_path / "ref.safetensors"
    safetensors.torch.save_file(PARAMS, str(reference), metadata={"round": "4"})
    # Same tensors, same header order; only the header's padding may differ.
    assert path.stat().st_size - reference.stat().st_size in range(0, 8)
    assert path.stat().st_mode & 0o777 == 0o600


def test_without_o_direct_the_file_is_written_the_usual_way(tmp_path, monkeypatch, caplog):
    def refuse(self, path, params, metadata=None):
        with open(path, "wb") as half_written:  # whatever it left is discarded
            half_written.write(b"junk")
        raise DirectWriteUnsupported(22, "the file system refuses O_DIRECT")

    monkeypatch.setattr(DirectWriter, "write", refuse)
    caplog.set_level(logging.INFO, logger="flkit.server")
    writer = DirectWriter()
    save_params(tmp_path / "a.safetensors", PARAMS, None, writer)
    _same(tmp_path / "a.safetensors")
    assert writer.usable is False and "without O_DIRECT" in caplog.text
    save_params(tmp_path / "b.safetensors", PARAMS, None, writer)  # not tried again
    _same(tmp_path / "b.safetensors")


def test_the_persistor_writes_its_models_directly(tmp_path, monkeypatch):
    used = []
    real = direct_write.DirectWriter.write

    def spy(self, path, params, metadata=None):
        used.append(path)
        return real(self, path, params, metadata)

    monkeypatch.setattr(direct_write.DirectWriter, "write", spy)
    store = Persistor(tmp_path)
    store.save_global(PARAMS, 3)
    store.close(timeout=30)
    _same(store.global_model_path)
    assert len(used) == 1 and store.global_model_round == 3
    assert persistor.load_params(store.global_model_path).keys() == PARAMS.keys()


def test_a_file_system_that_answers_eopnotsupp_is_written_the_usual_way(tmp_path, monkeypatch):
    import errno
    import os

    real_open = os.open

    def refuse_direct(path, flags, *args, **kwargs):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(direct_write.os, "open", refuse_direct)
    writer = DirectWriter()
    save_params(tmp_path / "a.safetensors", PARAMS, None, writer)
    _same(tmp_path / "a.safetensors")
    assert writer.usable is False
