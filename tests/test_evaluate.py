from pathlib import Path

import pyautoattack
import pytest
import torch

from engine.config import EvalConfig, ModelConfig
from engine.data import load_split
from engine.data.synthetic import synthetic_split
from engine.evaluate import evaluate
from engine.models import build_model, load_plain

CHECKPOINT = Path(pyautoattack.__file__).parent / "examples" / "model_test.pt"


@pytest.mark.data
def test_pyautoattack_checkpoint_on_real_test_data(cifar_dir):
    """Weights nobody here trained check the model definition and the data path together. The checkpoint's 94.6%
    is on the official pixels; on the JPEG-degraded copy it scores 85.6% on the full test set (85.35% on these
    2000): a wrong channel order gives ~75%, transposed images ~31%."""
    model = build_model(ModelConfig(split_bn=False), 10)
    load_plain(model, torch.load(CHECKPOINT, map_location="cpu"), "model_test.pt")
    results = evaluate(
        model,
        load_split("cifar10", cifar_dir, train=False),
        EvalConfig(attacks=("clean",), num_examples=2000),
        torch.device("cpu"),
    )
    assert 0.83 < results["clean"]["accuracy"] < 0.88


class SteepLinear(torch.nn.Module):
    """A linear classifier with large weights: every clean image is classified as labelled (labels are its own
    predictions), and an eps-step flips it, so AutoAttack's first attack ends the evaluation quickly."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 32 * 32, 10)
        self.bn_seen = set()

    def forward(self, x, bn="adv"):
        self.bn_seen.add(bn)
        return 50 * self.fc(x.flatten(1) - 0.5)


def test_autoattack_standard_on_a_breakable_model():
    torch.manual_seed(0)
    model = SteepLinear().train()
    split = synthetic_split(40, 10, seed=0)
    with torch.no_grad():
        x = torch.from_numpy(split.images).permute(0, 3, 1, 2).float() / 255
        split.labels = model(x).argmax(1).numpy()
    cfg = EvalConfig(attacks=("clean", "pgd20", "aa"), num_examples=40, aa_num_examples=20, batch_size=20)
    results = evaluate(model, split, cfg, torch.device("cpu"))
    assert results["aa"]["num_examples"] == 20 and results["clean"]["num_examples"] == 40
    assert results["clean"]["accuracy"] == 1.0
    assert results["aa"]["accuracy"] < 0.5 and results["pgd20"]["accuracy"] < 0.5  # both break the steep model
    assert model.bn_seen == {"adv"} and model.training  # adv BNs only; the caller's mode restored


def test_pgd20_s_captured_graphs_are_dropped_before_autoattack(monkeypatch):
    """AutoAttack's chunks are sized without PGD-20's captured graphs (pool, static buffers, the network they
    hold): the evaluation drops them once PGD-20 is done (a review found them kept to the end). CPU stand-in for
    the CUDA capture (tests/test_cuda_graphs.py's Rerun)."""
    from test_cuda_graphs import Rerun

    from engine import evaluate as evaluation
    from engine.attacks import graphs

    torch.manual_seed(0)
    model = SteepLinear().eval()
    split = synthetic_split(8, 10, seed=0)
    captured = graphs.AttackGraphs(Rerun(model), warmup=1)
    seen = {}
    attack_chunk = evaluation.autoattack.attack_chunk

    def watched(*args, **kwargs):
        seen.setdefault("entries_at_aa", captured.stats()["attacks"])
        return attack_chunk(*args, **kwargs)

    monkeypatch.setattr(evaluation, "attack_graphs", lambda *a, **k: captured)
    monkeypatch.setattr(evaluation.autoattack, "attack_chunk", watched)
    cfg = EvalConfig(attacks=("clean", "pgd20", "aa"), num_examples=8, aa_num_examples=4, batch_size=4, chunk_size=4)
    evaluate(model, split, cfg, torch.device("cpu"))
    assert captured.captures >= 1 and seen["entries_at_aa"] == 0


def test_an_evaluation_called_under_autocast_still_computes_in_fp32():
    """Its records say fp32; a caller's bf16 autocast (a training loop's, a notebook's) ran its forwards in bf16."""
    model = build_model(ModelConfig(width=8), 10)
    dtypes = []
    model.linear.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    split = synthetic_split(16, 10, seed=0)
    cfg = EvalConfig(attacks=("clean", "pgd20"), num_examples=16, batch_size=16, chunk_size=16)
    plain = evaluate(model, split, cfg, torch.device("cpu"), seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wrapped = evaluate(model, split, cfg, torch.device("cpu"), seed=1)
    assert set(dtypes) == {torch.float32}
    for attack in cfg.attacks:
        assert wrapped[attack]["flags"] == plain[attack]["flags"], attack
