import pytest

from engine.config import ConfigError, OptimConfig, TrainConfig, apply_overrides, from_dict
from engine.recipes import RECIPES, get_recipe


def test_overrides_parse_each_type():
    cfg = apply_overrides(
        TrainConfig(),
        [
            "train.epochs=3",
            "attack.eps=8/255",
            "perf.compile=true",
            "optim.milestones=2,4",
            "data.backend=dali",
            "eval.attacks=clean,aa",
        ],
    )
    assert cfg.epochs == 3 and cfg.attack.eps == pytest.approx(8 / 255) and cfg.perf.compile == "on"
    assert cfg.optim.milestones == (2, 4) and cfg.data.backend == "dali" and cfg.eval.attacks == ("clean", "aa")


def test_evaluation_attacks_run_in_one_order_whatever_the_order_written():
    """A compiled attacker reuses the graph of its first shape: AutoAttack's dynamic-batch graph would serve PGD-20
    after it, and PGD-20's last bits (and flags) would depend on the order written, which no chunk record keeps."""
    assert apply_overrides(TrainConfig(), ["eval.attacks=aa,pgd20,clean"]).eval.attacks == ("clean", "pgd20", "aa")
    assert apply_overrides(TrainConfig(), ["eval.attacks=aa,clean,aa"]).eval.attacks == ("clean", "aa")


@pytest.mark.parametrize("text", ["6,7", "[6, 7]", "(6,7)", " 6 , 7 "])
def test_a_tuple_override_takes_a_list_as_written(text):
    assert apply_overrides(TrainConfig(), [f"optim.milestones={text}"]).optim.milestones == (6, 7)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=x", "expected an int"),
        ("attack.eps=big", "expected a float"),
        ("optim.milestones=6;7", "expected comma-separated ints, e.g. optim.milestones=76,91"),
        ("nope.key=1", "unknown section"),
        ("model.depth=3", "unknown key"),
        ("model.arch=vgg", "not one of"),
        ("perf.compile=maybe", "not one of auto, on, off"),
        ("perf.channels_last=maybe", "true or false"),
        ("epochs=3", "section.key=value"),
        ("attack.eps=0", "attack.eps"),
        ("attack.eps=8", "write 8/255, not 8"),  # a pixel count where a fraction of the range is meant
        ("attack.step_size=2", "write 2/255, not 2"),
    ],
)
def test_bad_overrides_say_what_is_wrong(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(TrainConfig(), [override])


def test_round_trip_through_dict():
    cfg = get_recipe("arat-swa-wrn34-10-cifar10")
    assert from_dict(cfg.to_dict()) == cfg


def test_method_lr_schedule():
    o = OptimConfig()
    assert [o.lr_at(e) for e in (1, 2, 76, 77, 91, 92, 100)] == pytest.approx(
        [0.02, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )


def test_full_scale_recipes_match_method():
    names = {
        "arat-resnet18-cifar10",
        "arat-wrn34-10-cifar10",
        "arat-resnet18-cifar100",
        "arat-wrn34-10-cifar100",
        "arat-swa-resnet18-cifar10",
        "arat-swa-wrn34-10-cifar10",
        "demo",
        "smoke",
    }
    assert names <= set(RECIPES)
    rn, wrn = get_recipe("arat-resnet18-cifar10"), get_recipe("arat-wrn34-10-cifar10")
    assert (rn.epochs, rn.batch_size, rn.method.invariance_weight, rn.attack.num_steps) == (100, 128, 30.0, 10)
    assert rn.attack.step_size == pytest.approx(2 / 255) and rn.attack.eps == pytest.approx(8 / 255)
    assert (rn.optim.momentum, rn.optim.weight_decay, rn.optim.nesterov) == (0.9, 5e-4, False)
    assert wrn.method.invariance_weight == 100.0 and wrn.model.arch == "wrn34-10"
    swa = get_recipe("arat-swa-resnet18-cifar10").swa
    assert (swa.enabled, swa.start_epoch, swa.every) == (True, 76, 500)
    assert get_recipe("arat-resnet18-cifar100").data.num_classes == 100


def test_unknown_recipe():
    with pytest.raises(ConfigError, match="arat recipes"):
        get_recipe("nope")


def test_a_config_written_with_a_bool_compile_switch_still_loads():
    raw = TrainConfig().to_dict()
    raw["perf"]["compile"] = True  # config.json of a run started before perf.compile became auto|on|off
    assert from_dict(raw).perf.compile == "on"
    raw["perf"]["channels_last"] = "yes"
    with pytest.raises(ConfigError, match="perf.channels_last='yes' is not a bool"):
        from_dict(raw)


def test_swa_where_its_bn_re_estimation_or_averaging_cannot_fit_the_method_is_refused():
    """helper-83: SWA re-estimates BN statistics on PGD examples, which standard training never sees, and ARREST's
    default averaging start (76) lies inside its standard stage (100 epochs): both refused in one line; ARREST
    averaging within its fine-tuning, and the adversarial baselines, are taken."""
    from engine.config import ConfigError, apply_overrides, check_trainable
    from engine.recipes import get_recipe

    def trainable(recipe, overrides):
        cfg = apply_overrides(get_recipe(recipe), overrides)  # a config that reads (an older run's: evaluated)
        check_trainable(cfg)  # what build_run checks before training

    with pytest.raises(ConfigError, match="standard training never sees"):
        trainable("std-resnet18-cifar10", ["swa.enabled=true"])
    with pytest.raises(ConfigError, match="runs to epoch 100"):
        trainable("arrest-resnet18-cifar10", ["swa.enabled=true"])
    trainable("arrest-resnet18-cifar10", ["swa.enabled=true", "swa.start_epoch=101"])
    trainable("trades-resnet18-cifar10", ["swa.enabled=true"])


def test_switches_a_method_would_silently_ignore_are_refused():
    """helper-83: attack.official_quirk replaced any attack.start with its uniform start, and method.init on another
    method than ARREST was never read; both are now one line."""
    from engine.config import ConfigError, apply_overrides, check_trainable
    from engine.methods import build_method
    from engine.models import build_model
    from engine.recipes import get_recipe

    quirk = apply_overrides(
        get_recipe("arat-resnet18-cifar10"), ["attack.official_quirk=true", "attack.start=gaussian"]
    )
    with pytest.raises(ConfigError, match="leave attack.start=uniform"):
        build_method(quirk, build_model(quirk.model, 10))
    init = apply_overrides(get_recipe("at-resnet18-cifar10"), ["method.init=x.pt"])  # an older run's config reads
    with pytest.raises(ConfigError, match="drop method.init"):
        check_trainable(init)
