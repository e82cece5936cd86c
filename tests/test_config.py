import re

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


def test_nesterov_without_momentum_is_one_line_not_torch_s_error():
    """torch's SGD raised its own ValueError when built, after the data had loaded; now the config says it."""
    with pytest.raises(ConfigError, match="optim.nesterov needs optim.momentum > 0"):
        apply_overrides(TrainConfig(), ["optim.nesterov=true", "optim.momentum=0"])
    assert apply_overrides(TrainConfig(), ["optim.nesterov=true"]).optim.nesterov


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
        "arat-swa-resnet18-cifar100",  # helper-153: refused by reproduce.sh, though the official code ships it
        "arat-swa-wrn34-10-cifar100",
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
    swa100 = get_recipe("arat-swa-wrn34-10-cifar100")
    assert swa100.swa == get_recipe("arat-swa-wrn34-10-cifar10").swa and swa100.data.num_classes == 100
    assert swa100.method == get_recipe("arat-wrn34-10-cifar100").method


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
    # fine-tuning an --init (no standard stage): averaging from its first epoch, start_epoch 0 or 1 alike (0 was
    # refused for "a standard stage running to epoch 0")
    for start in (0, 1):
        trainable("arrest-resnet18-cifar10", ["method.init=x.pt", "method.pretrain_epochs=0", "swa.enabled=true",
                                              f"swa.start_epoch={start}"])  # fmt: skip
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


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["optim.milestones=2,2"], "each once (a repeated one decays the rate twice at once)"),
        (["method.finetune_milestones=0,5"], "epochs counted from 1"),
        (["model.arch=wrn34-10", "model.width=16"], "sizes ResNet-18 only"),  # silently ignored before
        (["data.data_dir= "], "data.data_dir is empty"),
    ],
)
def test_settings_that_trained_something_else_are_refused_for_training(overrides, says):
    """Refused when a run is built, not when a config is read: an older run's config.json holding one (accepted
    before) still loads for its evaluation and export."""
    from engine.config import check_trainable

    cfg = apply_overrides(get_recipe("smoke"), overrides)
    assert from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=re.escape(says)):
        check_trainable(cfg)


def test_a_bad_milestone_list_is_one_line_and_an_empty_data_dir_variable_is_unset(monkeypatch):
    with pytest.raises(ConfigError, match="epochs, as comma-separated whole numbers"):  # a ValueError traceback
        apply_overrides(get_recipe("smoke"), ["optim.milestones=", "optim.milestones=abc"])
    monkeypatch.setenv("ARAT_DATA_DIR", "")  # exported but empty (a wrapper's export ARAT_DATA_DIR=$X)
    assert get_recipe("smoke").data.data_dir == "./data"


@pytest.mark.parametrize(
    ("recipe", "overrides", "says"),
    [
        ("at-resnet18-cifar10", ["method.invariance_weight=100"], "at does not read method.invariance_weight"),
        ("trades-resnet18-cifar10", ["method.stop_grad=false"], "trades does not read method.stop_grad"),
        ("smoke", ["method.beta=3"], "arat does not read method.beta"),
        ("smoke", ["method.fixed_adv_weight=0.3"], "fixed_adv_weight (read with method.auto_balance=false)"),
        ("smoke", ["method.symmetric=average"], "symmetric (read with method.stop_grad=false)"),
    ],
)
def test_method_keys_the_method_does_not_read_are_said(recipe, overrides, says):
    """Accepted in silence before: the run trained as if they were not set. Said at start, not refused
    (scripts/reproduce.sh gives every method's run the same --set pairs)."""
    from engine.config import ignored_keys_notice

    assert says in ignored_keys_notice(apply_overrides(get_recipe(recipe), overrides).method)
    assert ignored_keys_notice(get_recipe(recipe).method) is None
    fixed = apply_overrides(get_recipe("smoke"), ["method.auto_balance=false", "method.fixed_adv_weight=0.3"])
    assert ignored_keys_notice(fixed.method) is None


def test_a_gaussian_start_without_a_step_is_refused_for_training():
    """Only a PGD step projects onto [0, 1]: TRADES's x + 0.001 N(0, 1) start alone trains outside it (the attack
    itself takes 0 steps: a library call may want the start alone)."""
    from engine.config import check_trainable

    with pytest.raises(ConfigError, match=re.escape("outside [0, 1]")):
        check_trainable(apply_overrides(get_recipe("trades-resnet18-cifar10"), ["attack.num_steps=0"]))


def test_every_recipe_sets_only_keys_its_method_reads_and_every_method_is_listed():
    from engine.config import METHOD_KEYS, check_trainable, ignored_keys_notice
    from engine.methods import METHODS

    assert METHOD_KEYS.keys() == METHODS.keys()
    for name in RECIPES:
        check_trainable(get_recipe(name))
        assert ignored_keys_notice(get_recipe(name).method) is None, name


def test_a_recipe_without_a_warm_first_epoch_keeps_none_when_its_lr_is_set():
    """The baselines' first_epoch_lr is their lr, a number in the recipe: `--set optim.lr=0.05` ran epoch 1 at 0.1
    and the rest at 0.05. A warm first epoch (AR-AT's 0.02) stays, and an explicit one wins."""
    at = apply_overrides(get_recipe("at-resnet18-cifar10"), ["optim.lr=0.05"])
    assert at.optim.lr_at(1) == at.optim.lr_at(2) == 0.05
    arat = apply_overrides(get_recipe("arat-resnet18-cifar10"), ["optim.lr=0.05"])
    assert arat.optim.lr_at(1) == 0.02 and arat.optim.lr_at(2) == 0.05
    both = apply_overrides(get_recipe("at-resnet18-cifar10"), ["optim.lr=0.05", "optim.first_epoch_lr=0.01"])
    assert both.optim.lr_at(1) == 0.01


def test_a_milestone_the_run_never_reaches_is_said():
    from engine.config import schedule_notice

    assert schedule_notice(get_recipe("arat-resnet18-cifar10")) is None
    short = apply_overrides(get_recipe("arat-resnet18-cifar10"), ["train.epochs=30"])
    assert "never decays after epochs 76, 91 in a run of 30 epochs" in schedule_notice(short)
    arrest = apply_overrides(get_recipe("arrest-resnet18-cifar10"), ["method.finetune_milestones=10,25"])
    assert "method.finetune_milestones=10,25: the learning rate never decays after epoch 25 in a run of 20" in (
        schedule_notice(arrest)
    )


def test_a_config_written_before_a_later_key_reads_as_what_its_run_trained_with():
    """helper-118: method.published_bn_updates (2026-12-02, default on) read from an older run's config.json took
    today's default, so a resumed TRADES/LBGAT run changed its BN updates part-way without a word, and `arat table`
    grouped it with runs that differ. A config without the key reads as the engines before it did (off)."""
    raw = get_recipe("trades-resnet18-cifar10").to_dict()
    assert from_dict(raw).method.published_bn_updates is True  # written today: as written
    del raw["method"]["published_bn_updates"]
    assert from_dict(raw, "config.json").method.published_bn_updates is False
    raw["method"]["published_bn_updates"] = True
    assert from_dict(raw).method.published_bn_updates is True


def test_a_resume_compares_learning_rates_as_numbers_not_their_last_bits():
    """A decay of 0.01 at one milestone is the rate of two decays of 0.1 at the same one (0.1 * 0.1 * 0.1 is not
    0.1 * 0.01 in floating point: a resume was refused, "0.001 -> 0.001")."""
    from engine.config import resume_change

    raw = get_recipe("smoke").to_dict()
    raw["optim"] |= {"milestones": [1, 1], "decay": 0.1, "lr": 0.1, "first_epoch_lr": 0.1}
    trained = from_dict(raw)
    now = apply_overrides(trained, ["optim.milestones=1", "optim.decay=0.01", "train.epochs=3"])
    assert resume_change(trained, now, 2) is None
    assert "epoch 2's rate" in resume_change(trained, apply_overrides(now, ["optim.decay=0.02"]), 2)


def test_a_saved_config_s_refused_value_names_the_file():
    """helper-118: a value an older engine took (eval.aa_version=plus) stopped `arat export` with a line that did
    not say it came from the run's config.json; a --set value is still said as given."""
    raw = get_recipe("smoke").to_dict()
    raw["eval"]["aa_version"] = "plus"
    with pytest.raises(ConfigError, match=r"^runs/x/config.json: eval.aa_version='plus' is not one of"):
        from_dict(raw, "runs/x/config.json")
    with pytest.raises(ConfigError, match=r"^eval.aa_version='plus' is not one of"):
        apply_overrides(get_recipe("smoke"), ["eval.aa_version=plus"])
    raw["eval"]["aa_version"], raw["model"]["width"] = "standard", "64"  # a wrong type: said with the file once
    with pytest.raises(ConfigError, match=r"^runs/x/config.json: model.width='64' is not a"):
        from_dict(raw, "runs/x/config.json")
