"""A flipped bit inside a ``.pt`` checkpoint's tensor data is refused (zip CRC-32), not loaded as other weights."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

import tiny_models
from influence.cli import main
from influence.errors import BadCheckpointError
from influence.loading import load_checkpoint


def _flip_in_tensor_data(src: Path, dst: Path) -> None:
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    # the local header is 30 bytes plus name and extra field; flip a bit in the middle of the stored bytes
    name_len = int.from_bytes(data[info.header_offset + 26: info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28: info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x08
    dst.write_bytes(bytes(data))


def test_flipped_bit_in_tensor_data_is_refused(cnn_ckpts, tmp_path, digits, capsys):
    src = Path(cnn_ckpts.paths[0])
    bad = tmp_path / "flipped.pt"
    _flip_in_tensor_data(src, bad)
    good, flipped = torch.load(src, weights_only=True), torch.load(bad, weights_only=True)
    # torch.load alone accepts it and returns different weights: the silent case this guards against
    assert any(not torch.equal(good[k], flipped[k]) for k in good)
    with pytest.raises(BadCheckpointError, match="flipped.pt.*CRC"):
        load_checkpoint(tiny_models.tiny_cnn(), bad)
    load_checkpoint(tiny_models.tiny_cnn(), src)  # the intact file still loads
    code = main(["build", "--model", f"{tiny_models.__file__}:tiny_cnn", "--data", str(digits.train_npz),
                 "--checkpoint", str(bad), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "flipped.pt" in err and len(err.strip().splitlines()) == 1, err
