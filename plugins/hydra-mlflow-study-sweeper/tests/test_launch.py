"""A trial run in the sweep's process on its one config is the job Hydra's own path makes: the
same folders and .hydra/ files byte for byte, the same config, Hydra config, working directory,
environment and log, as the basic launcher's load_sweep_config and run_job give it."""

from __future__ import annotations

import json
import re

import pytest
from harness import APPS, clean_env, run_in_process

from mlflow_study_sweeper.trial import launch, yaml_files
from mlflow_study_sweeper.trial.launch import override_dirname

PROBE = APPS / "probe" / "probe_app.py"
# what may differ between two sweeps: their folders, and the ids MLflow and Optuna hand out
IDS = re.compile(r"[0-9a-f]{32}|(?<=SWEEP_TRIAL_ID[=:] )'?\d+'?|(?<=TRIAL_ID=)\d+")


# the probe app's 3 trials: a fixed value left out of override_dirname by the config, another
PROBE_SWEEP = (PROBE, "y=0.25", "nested.value=4")


def sweep(path, monkeypatch, through_hydra: bool, app=PROBE_SWEEP) -> dict[str, str]:
    """An app's trials (the probe's 3 by default); every file its jobs left, path-independent."""
    if through_hydra:
        made = launch.InProcessJobs.__init__

        def via_hydra(self, *args, **kwargs):
            made(self, *args, **kwargs)
            self.through_hydra = True

        monkeypatch.setattr(launch.InProcessJobs, "__init__", via_hydra)
    path.mkdir()
    argv = [
        str(app[0]),
        "-m",
        f"hydra.sweep.dir={path}/multirun",
        f"hydra.sweeper.storage=sqlite:///{path}/optuna.db",
        f"hydra.sweeper.tracking_uri=sqlite:///{path}/mlflow.db",
        *app[1:],
    ]
    proc = run_in_process(argv, path, clean_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    monkeypatch.undo()
    files = {}
    for file in sorted((path / "multirun").rglob("*")):
        if file.is_file() and file.suffix in (".yaml", ".json", ".log"):
            text = file.read_text().replace(str(path), "<folder>")
            if file.suffix == ".log":  # lines carry their time
                text = re.sub(r"^\[[^]]*\]", "[time]", text, flags=re.M)
            files[str(file.relative_to(path))] = IDS.sub("<id>", text)
    return files


def test_the_one_config_path_writes_what_hydras_own_path_writes(tmp_path, monkeypatch):
    fast = sweep(tmp_path / "fast", monkeypatch, through_hydra=False)
    hydra = sweep(tmp_path / "hydra", monkeypatch, through_hydra=True)
    assert sorted(fast) == sorted(hydra)
    assert len([f for f in fast if f.endswith("probe.json")]) == 3
    for name in fast:
        assert fast[name] == hydra[name], name
    # and what the jobs saw is what the config says
    # the grid sampler's first point is x=3
    first = json.loads(fast["multirun/0_nested.value=4,x=3/probe.json"])
    assert first["cfg"] == {"x": 3, "y": 0.25, "label": "x is 3", "nested": {"value": 4}}
    assert first["job"]["override_dirname"] == "nested.value=4,x=3"
    assert first["cwd"] == first["output_dir"] == "<folder>/multirun/0_nested.value=4,x=3"
    assert first["env"] == {"SWEEP_TRIAL_NUMBER": "0", "PROBE": "set-by-config"}
    assert first["hydra_resolver"] == 0 and first["struct"]
    assert first["log_files"] == ["probe_app.log"]
    assert "a line in the job's log" in fast["multirun/0_nested.value=4,x=3/probe_app.log"]


@pytest.mark.parametrize(
    "overrides, exclude, expected",
    [
        ([("b", "b=2"), ("a", "a=1")], [], "a=1,b=2"),
        ([("b", "b=2"), ("a", "a=1")], ["b"], "a=1"),
        ([("+c", "+c=x y"), ("a", "a=1")], [], "+c=x y,a=1"),
    ],
)
def test_override_dirname_as_hydra_computes_it(overrides, exclude, expected):
    assert override_dirname(overrides, exclude, ",", "=") == expected
    assert override_dirname(overrides, exclude, "/", ":") == expected.replace(",", "/").replace(
        "=", ":"
    )


# a search-space function's params: Hydra's example adds `+w`, a key its config lacks; the
# optimizer app's momentum is drawn for SGD only (the enqueued order: sgd, adam, sgd, adam)
FUNCTION_SWEEPS = {
    "+w": (
        APPS / "hydra_custom" / "custom-search-space-objective.py",
        "hydra.sweeper.n_trials=3",
        "hydra.job.chdir=True",
    ),
    "conditional": (
        APPS / "optimizer_app.py",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.enqueue=[{optimizer.name: sgd, lr: 0.01}, {optimizer.name: adam, lr: 0.02}, "
        "{optimizer.name: sgd, lr: 0.03}, {optimizer.name: adam, lr: 0.04}]",
    ),
}


@pytest.mark.filterwarnings("ignore::hydra.errors.Hydra14MigrationWarning")  # Hydra's example
@pytest.mark.parametrize("name", sorted(FUNCTION_SWEEPS))
def test_a_search_space_functions_params_reach_the_job_as_hydras_own_path_has_them(
    tmp_path, monkeypatch, name
):
    app = FUNCTION_SWEEPS[name]
    fast = sweep(tmp_path / "fast", monkeypatch, through_hydra=False, app=app)
    hydra = sweep(tmp_path / "hydra", monkeypatch, through_hydra=True, app=app)
    assert sorted(fast) == sorted(hydra)
    configs = sorted(f for f in fast if f.endswith(".hydra/config.yaml"))
    assert len(configs) == int(app[1].rsplit("=", 1)[1])
    for file in fast:
        assert fast[file] == hydra[file], file
    for file in configs:
        overrides = fast[file.replace("config.yaml", "overrides.yaml")]
        if name == "+w":  # the new key in the job's config and in its overrides, as `+w=...`
            assert "\nw: " in fast[file] and "- +w=" in overrides
        elif "- optimizer.name=adam" in overrides:  # after an SGD trial: the config's momentum
            assert "momentum: 0.0\n" in fast[file] and "momentum" not in overrides
        else:
            assert "- optimizer.momentum=" in overrides


def test_yaml_blocks_render_what_to_yaml_renders_as_values_change():
    """.hydra/ files are rendered again only where a trial changed them: the same text as
    OmegaConf.to_yaml, whatever changes between two trials."""
    from omegaconf import OmegaConf

    blocks = yaml_files.YamlTree()
    steps = [
        {"a": 1, "b": {"c": [1, 2], "d": "x: y"}, "e": None, "f": {}, "g": []},
        {"a": True, "b": {"c": [1, 2], "d": "x: y"}, "e": None, "f": {}, "g": []},
        {"a": 1.0, "b": {"c": [1, 3], "d": "yes"}, "e": "${x}", "f": {"k": 1}, "g": ["-"]},
        {"a": "1", "b": {"d": "é " * 60}, "e": None, "f": {}, "g": [{"h": 1}]},
        {"a": 1, "b": {"c": [1, 2], "d": "x: y"}, "e": None, "f": {}, "g": []},
    ]
    for values in steps:
        node = OmegaConf.create(values)
        assert blocks(node) == OmegaConf.to_yaml(node)
    assert blocks(OmegaConf.create({})) == OmegaConf.to_yaml(OmegaConf.create({}))


@pytest.mark.parametrize(
    "value, only_time",
    [
        ("multirun/${now:%Y-%m-%d}/${now:%H-%M-%S}", True),  # Hydra's default
        ("/abs/sweeps", True),
        ("multirun/${hydra.job.name}/${now:%H}", False),
        ("multirun/${x}", False),
        ("${now:${x}}", False),
        (None, False),
    ],
)
def test_a_sweep_folder_is_resolved_once_only_when_it_names_nothing_but_the_time(value, only_time):
    assert launch.only_the_time(value) == only_time


def test_set_changed_leaves_what_an_assignment_leaves():
    from omegaconf import OmegaConf, open_dict

    steps = [
        ("l", ["a=1", "b=${x}"]),
        ("l", ["a=2", "b=${x}"]),  # one item changed
        ("l", ["a=2"]),  # shorter
        ("d", {"A": "1", "B": "2"}),
        ("d", {"A": "1", "B": "3"}),
        ("d", {"B": "3", "A": "1"}),  # the same keys in another order
        ("d", {"A": 1, "B": "3"}),  # another type
        ("d", None),
    ]
    fast, plain = OmegaConf.create({"x": 0}), OmegaConf.create({"x": 0})
    with open_dict(fast), open_dict(plain):
        for key, value in steps:
            launch.set_changed(fast, key, value)
            plain[key] = value
            assert OmegaConf.to_yaml(fast) == OmegaConf.to_yaml(plain)
            assert OmegaConf.to_container(fast, resolve=False) == OmegaConf.to_container(plain)


def test_hydra_yaml_is_what_hydra_writes_long_values_included(tmp_path):
    """hydra.yaml as Hydra writes it (to_yaml of the masked hydra node), trial after trial: a long
    value wraps where it wraps in the whole document, not where it would at the left margin."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    (tmp_path / "config.yaml").write_text("x: 1\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True, overrides=["x=2"])
    render = yaml_files.HydraYaml()
    for number, env in enumerate(["word " * 20, "w" * 90, "short", "word " * 30]):
        with open_dict(cfg):
            cfg.hydra.job.num = number
            cfg.hydra.job.env_set = {"LONG": env, "N": str(number)}
            cfg.hydra.overrides.task = [f"x={number}", f"+c={env}"]
            cfg.hydra.runtime.output_dir = f"/tmp/{'folder ' * 12}/{number}"
        assert render(cfg) == OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, "hydra"))


def test_the_sweeps_logging_comes_back_when_a_record_comes(tmp_path, monkeypatch):
    """After a job, the sweep's logging is set up by the first record made, not before: a record
    between two trials goes where the sweep's logging sends it, not to the job's log; a job
    that starts first takes the stand-in down unused."""
    import logging

    from hydra import compose, initialize_config_dir
    from hydra.core.utils import configure_log
    from omegaconf import open_dict

    (tmp_path / "config.yaml").write_text("x: 1\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.job.name = "app"
    setups = []
    real = launch.configure_log
    monkeypatch.setattr(launch, "configure_log", lambda *a: setups.append(a) or real(*a))
    factory = logging.getLogRecordFactory()
    sweep = launch.SweepLogging(cfg.hydra.hydra_logging, cfg.hydra.verbose, cfg.hydra.job_logging)
    assert sweep.lazy and sweep.level == logging.INFO
    try:
        for trial, between in ((0, False), (1, True), (2, False)):
            sweep.before_job()
            with open_dict(cfg):
                cfg.hydra.runtime.output_dir = str(tmp_path / str(trial))
            (tmp_path / str(trial)).mkdir()
            configure_log(cfg.hydra.job_logging, cfg.hydra.verbose)  # the job's, as run_job
            logging.getLogger("job").info("in the job")
            sweep.after_job()
            assert setups == [] and logging.getLogRecordFactory() is not factory
            if between:
                logging.getLogger("sweeper").warning("between two trials")
                assert len(setups) == 1 and logging.getLogRecordFactory() is factory
                handlers = logging.getLogger().handlers
                assert [h.formatter._fmt for h in handlers] == ["[%(asctime)s][HYDRA] %(message)s"]
                setups.clear()
        sweep.before_job()
        assert logging.getLogRecordFactory() is factory
        logs = [(tmp_path / str(trial) / "app.log").read_text() for trial in range(3)]
        assert all("in the job" in log and "between" not in log for log in logs)
    finally:
        sweep.before_job()
        configure_log(cfg.hydra.hydra_logging, cfg.hydra.verbose)


def test_the_sweeps_logging_is_set_up_at_once_where_a_stand_in_would_differ(tmp_path):
    from hydra import compose, initialize_config_dir

    (tmp_path / "config.yaml").write_text("x: 1\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    from omegaconf import OmegaConf

    hydra, job = cfg.hydra.hydra_logging, cfg.hydra.job_logging

    plain = OmegaConf.to_container(hydra), OmegaConf.to_container(job, resolve=False)
    disabling = OmegaConf.create({**plain[0], "disable_existing_loggers": True})
    naming = OmegaConf.create({**plain[1], "loggers": {"mylib": {"level": "DEBUG"}}})
    assert not launch.SweepLogging(disabling, False, job).lazy
    assert not launch.SweepLogging(hydra, False, naming).lazy
    assert launch.SweepLogging(hydra, True, job).level == 10  # verbose: DEBUG on the root


def test_plain_interpolations_resolve_as_omegaconf_resolves_them():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {"a": {"b": "/out", "n": 3, "f": 0.5, "t": True}, "name": "app", "m": "???", "r": "${a.n}"}
    )
    for value in ("${a.b}/${name}.log", "${a.n}", "n=${a.n} f=${a.f} t=${a.t}", "${r}", "plain"):
        cfg_with = OmegaConf.merge(cfg, {"probe": value})
        expected = OmegaConf.to_container(cfg_with, resolve=True)["probe"]
        assert launch.resolve_simply({"v": [value]}, cfg_with) == {"v": [expected]}, value
    for value in ("${oc.env:HOME}", "${.b}", "\\${a.b}", "${m}", "${nowhere}", "${a}"):
        with pytest.raises(LookupError):
            launch.resolve_simply(value, cfg)


def test_a_jobs_log_files_move_to_the_next_trial_while_its_logging_is_unchanged(
    tmp_path, monkeypatch
):
    """Each trial's job logging as Hydra's configure_log makes it, the file handlers moved from
    one trial's folder to the next's instead of being made again, while nothing changed them."""
    import logging

    from hydra import compose, initialize_config_dir
    from hydra.core.utils import configure_log
    from omegaconf import open_dict

    (tmp_path / "config.yaml").write_text("x: 1\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    setups = []
    real = launch.configure_log
    monkeypatch.setattr(launch, "configure_log", lambda *a: setups.append(a) or real(*a))
    job_logging = launch.JobLogging()
    try:
        for trial in range(4):
            folder = tmp_path / str(trial)
            folder.mkdir()
            with open_dict(cfg):
                cfg.hydra.runtime.output_dir = str(folder)
                cfg.hydra.job.name = "app"
            job_logging.set_up(cfg)
            logging.getLogger("job").info("trial %d", trial)
            if trial == 2:  # a job that adds a handler: the next setup is logging.config's
                logging.getLogger().addHandler(logging.NullHandler())
        assert len(setups) == 2  # the first trial's, and the one after the added handler
        for trial in range(4):
            log = (tmp_path / str(trial) / "app.log").read_text()
            assert log.count("trial") == 1 and f"trial {trial}" in log
    finally:
        configure_log(cfg.hydra.hydra_logging, cfg.hydra.verbose)


@pytest.mark.parametrize("path", [(), ("hydra", "job")])
def test_yaml_tree_renders_what_to_yaml_renders_through_random_changes(path, monkeypatch):
    """Mappings in mappings, lists of values and of mappings, long strings that wrap, strings
    YAML must quote, values that change type, keys that come and go: at every step the kept and
    re-rendered texts make what to_yaml makes of the whole."""
    import random

    from omegaconf import OmegaConf

    rng = random.Random(7)
    scalars = [0, 1, 1.0, -2.5, 1e17, -0.0, float("inf"), float("nan"), 10**30, True, False,
               None, "", "x", "yes", "1", "null", "a: b", "# c", "~", "w " * 50, "é" * 90,
               "${x.y}", "line\nbreak", "-", "[1]"]  # fmt: skip

    def value(depth: int) -> object:
        kind = rng.random()
        if depth < 3 and kind < 0.25:
            return {f"k{i}": value(depth + 1) for i in range(rng.randint(0, 4))}
        if depth < 3 and kind < 0.4:
            return [value(depth + 1) for _ in range(rng.randint(0, 4))]
        return rng.choice(scalars)

    def mutate(node: dict, depth: int = 0) -> None:
        key = rng.choice([*node, f"k{rng.randint(0, 5)}"])
        if key in node and isinstance(node[key], dict) and node[key] and rng.random() < 0.7:
            mutate(node[key], depth + 1)
        elif key in node and isinstance(node[key], list) and node[key] and rng.random() < 0.6:
            node[key][rng.randrange(len(node[key]))] = value(depth + 1)
        elif key in node and rng.random() < 0.2:
            del node[key]
        else:
            node[key] = value(depth + 1)

    doc = {f"k{i}": value(1) for i in range(5)}
    tree = yaml_files.YamlTree(path)
    renders = []
    dump = yaml_files.yaml_text
    monkeypatch.setattr(yaml_files, "yaml_text", lambda c: renders.append(c) or dump(c))
    monkeypatch.setattr(yaml_files, "whole", None)  # never the fallback: every text is kept
    for _ in range(300):
        node = OmegaConf.create(doc)
        expected = OmegaConf.to_yaml(yaml_files.under(path, doc) if path else node)
        expected = yaml_files.drop_lines(expected, max(len(path) - 1, 0))
        renders.clear()
        assert tree(node) == expected
        assert len(renders) <= 1  # what changed, in one dump
        mutate(doc)
        if not doc:
            doc["k0"] = 1


def test_yaml_text_of_plain_strings_is_to_yamls_from_libyaml_too(monkeypatch):
    """A document whose strings are all plain goes to libyaml's emitter (where installed), and
    its text is to_yaml's byte for byte: random strings of those characters, up to 120 long
    (they wrap at spaces past 80), some made to look like numbers, bools, keys or list items."""
    import random

    import yaml
    from omegaconf import OmegaConf

    rng = random.Random(3)
    chars = "abcXYZ019 _./=,:+@-"
    tricky = ["", "1.5", "-1", "1e3", "true", "No", "null", "- x", "a: b", ":", "@x", "-",
              "x=1.5,y=-0.2", "/tmp/multirun/2026-12-05/17-32-33/12", " lead", "trail ",
              "0x1f"]  # fmt: skip

    def text() -> str:
        if rng.random() < 0.3:
            return rng.choice(tricky)
        return "".join(rng.choice(chars) for _ in range(rng.randint(0, 120)))

    used, real = [], yaml.dump
    monkeypatch.setattr(yaml, "dump", lambda *a, **k: used.append(k["Dumper"]) or real(*a, **k))
    for _ in range(2000):
        doc = {"hydra": {text() or "k": text(), "job": {"list": [text(), 1, 0.5, None, True]}}}
        assert yaml_files.plain(doc)
        used.clear()
        text_written = yaml_files.yaml_text(doc)
        if yaml.__with_libyaml__:
            assert issubclass(used[0], yaml.CDumper)
        assert text_written == OmegaConf.to_yaml(OmegaConf.create(doc))
    assert not yaml_files.plain({"k": "é"}) and not yaml_files.plain({"k": 'say "x"'})
