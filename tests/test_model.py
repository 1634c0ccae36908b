"""mhsft/model.py: a config-only folder (RANDOM_INIT) loads with seeded random weights, without touching the caller's
RNG; its load is the same model each time."""

from __future__ import annotations

import json
import shutil

import torch

from mhsft.model import RANDOM_INIT, load_model


def test_random_init_folder_draws_seeded_weights_and_leaves_the_rng(tiny_model_dir, tmp_path):
    folder = tmp_path / "random"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    (folder / RANDOM_INIT).write_text(json.dumps({"seed": 3}), encoding="utf-8")
    torch.manual_seed(11)
    expected = torch.rand(4)
    torch.manual_seed(11)
    a = load_model(str(folder), dtype="float32", device="cpu")
    assert torch.equal(torch.rand(4), expected)  # the caller's dropout seeds are as they would be
    b = load_model(str(folder), dtype="bfloat16", device="cpu")
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys() and next(iter(pb.values())).dtype == torch.bfloat16
    for n in pa:
        torch.testing.assert_close(pa[n].to(torch.bfloat16), pb[n], rtol=0, atol=0)
    (folder / RANDOM_INIT).write_text(json.dumps({"seed": 4}), encoding="utf-8")
    c = load_model(str(folder), dtype="float32", device="cpu")
    assert not torch.equal(
        pa["model.layers.0.mlp.up_proj.weight"],
        dict(c.named_parameters())["model.layers.0.mlp.up_proj.weight"],
    )
