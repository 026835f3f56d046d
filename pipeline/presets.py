"""Presets as deltas on a base: which configuration files the pipeline reads, and in which order.

Why: Luigi reads ``./luigi.cfg`` and then the ``$LUIGI_CONFIG_PATH`` file on top of it. While ``./luigi.cfg``
held the demo's stage values, every preset run from the repository root silently inherited what it did not set
(``configs/voc.cfg`` walked T^16 instead of T^256), and the same preset meant other values from another
directory. So ``luigi.cfg`` now holds only runtime choices (scheduler, ``[retcode]``, ``[wsss]``), and a preset
names what it builds on::

    [preset]
    base = demo.cfg

The rules, applied when ``pipeline`` is imported (before Luigi reads any parameter):

* The project's own ``luigi.cfg`` is read first whatever the current directory, so its ``[retcode]`` block
  (a failed run exits non-zero) is always in force; a ``./luigi.cfg`` that is another file comes after it.
* Every file is read after its bases (recursively; several bases one per line, in order). Each file is read
  once, at its first place; later files override earlier ones, as in Luigi.
* A file that sets a stage section (``[TrainCAM]``, ...) or names a base is a *preset*. When no file read is
  one (a bare run, or a runtime-only layer such as ``configs/cluster.cfg``), the preset named by
  ``[preset] default`` (``luigi.cfg``: the demo) is read right after the file naming it.
* A relative path is looked up next to the file that names it, then, for a copy of a preset written elsewhere
  (the Slurm template's job file), as the project's ``configs/<file name>``.

``python -m pipeline config`` prints every value in force and the file it came from (:func:`sources`).

Installing reloads Luigi's configuration from these files, so code that sets options by hand (tests, notebooks)
imports ``pipeline`` first and sets them afterwards (tests/conftest.py does).
"""

from __future__ import annotations

import configparser
import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import luigi.configuration
import luigi.task_register
from luigi.configuration import LuigiConfigParser

from stages.config import STAGE_CONFIGS

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROJECT_CFG = PROJECT_ROOT / "luigi.cfg"
PRESETS_DIR = PROJECT_ROOT / "configs"
SECTION = "preset"
KEYS = ("base", "default")
# Luigi's search list (luigi.configuration.cfg_parser); the bare "luigi.cfg" is the current directory's.
LUIGI_SEARCH_PATH = ("/etc/luigi/client.cfg", "/etc/luigi/luigi.cfg", "client.cfg", "luigi.cfg")
LOCAL_CFG = "luigi.cfg"


class PresetError(RuntimeError):
    """A configuration file that cannot be resolved; the message names the file."""


def read_file(path: Path) -> configparser.ConfigParser:
    """One file as Luigi parses it (option names case-sensitive), its ``[preset]`` keys checked."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # as LuigiConfigParser
    try:
        with open(path) as fh:
            parser.read_file(fh, source=str(path))
    except (OSError, configparser.Error) as exc:
        raise PresetError(f"{path}: cannot read this configuration file: {exc}") from exc
    if parser.has_section(SECTION):
        unknown = sorted(set(parser.options(SECTION)) - set(KEYS))
        if unknown:
            raise PresetError(f"{path}: [{SECTION}] has unknown key(s) {', '.join(unknown)}; "
                              f"known: {', '.join(KEYS)}")
    return parser


def find(value: str, named_by: Path, key: str = "base") -> Path:
    """The file a ``[preset]`` entry of ``named_by`` names (see the module docstring for the lookup)."""
    wanted = Path(value).expanduser()
    tried = [wanted] if wanted.is_absolute() else [named_by.parent / wanted, PRESETS_DIR / wanted.name]
    for candidate in tried:
        if candidate.is_file():
            return candidate.resolve()
    raise PresetError(f"{named_by}: [{SECTION}] {key} = {value}: no such file "
                      f"(looked for {' and '.join(str(p) for p in tried)})")


def _entries(path: Path, key: str) -> list[str]:
    raw = read_file(path).get(SECTION, key, fallback="")
    return [line.strip() for line in raw.splitlines() if line.strip()]


def bases(path: Path) -> list[Path]:
    """The files ``path`` declares as its bases, in reading order."""
    return [find(value, path) for value in _entries(path, "base")]


def chain(path: Path, _stack: tuple[Path, ...] = ()) -> list[Path]:
    """``path`` preceded by its bases, recursively, each file once."""
    path = path.resolve()
    if path in _stack:
        loop = " -> ".join(str(p) for p in (*_stack, path))
        raise PresetError(f"{_stack[-1]}: [{SECTION}] base chain loops: {loop}")
    files: list[Path] = []
    for base in bases(path):
        _extend(files, chain(base, (*_stack, path)))
    return _extend(files, [path])


def is_preset(path: Path) -> bool:
    """Whether ``path`` sets stage knobs or builds on a base (a layer of runtime settings does neither)."""
    parser = read_file(path)
    return bool(_entries(path, "base")) or any(section in STAGE_CONFIGS for section in parser.sections())


def _extend(files: list[Path], more: Iterable[Path]) -> list[Path]:
    files.extend(p for p in more if p not in files)
    return files


def _requested(search_path: Sequence[str], cwd: Path) -> list[Path]:
    """Luigi's search list with the project's luigi.cfg first and relative paths made absolute."""
    files: list[Path] = []
    for entry in search_path:
        if entry == LOCAL_CFG:
            files += [PROJECT_CFG, cwd / LOCAL_CFG]
        else:
            files.append(cwd / entry)
    if PROJECT_CFG not in files:
        files.insert(0, PROJECT_CFG)
    return [p.resolve() for p in files if p.is_file()]


def resolve(search_path: Sequence[str], cwd: Path) -> list[Path]:
    """The files to read, in order, for Luigi's ``search_path`` (its ``_config_paths``) seen from ``cwd``."""
    files: list[Path] = []
    for path in _requested(search_path, cwd):
        _extend(files, chain(path))
    if any(is_preset(p) for p in files):
        return files
    declaring = [p for p in files if _entries(p, "default")]
    if not declaring:
        return files
    named_by = declaring[-1]
    default = chain(find(_entries(named_by, "default")[-1], named_by, key="default"))
    at = files.index(named_by) + 1
    return _extend(files[:at], [*default, *files[at:]])


def install() -> list[Path]:
    """Make Luigi read :func:`resolve`'s files (kept in its search list, so a later ``reload`` agrees)."""
    selected = os.environ.get("LUIGI_CONFIG_PATH", "")
    if selected and not Path(selected).is_file():
        raise PresetError(f"LUIGI_CONFIG_PATH={selected}: no such file (from {Path.cwd()})")
    files = resolve(LuigiConfigParser._config_paths, Path.cwd())
    LuigiConfigParser._config_paths = [str(p) for p in files]
    if LuigiConfigParser._instance is not None:  # otherwise Luigi reads them when it first needs a value
        LuigiConfigParser.reload()
    return files


@contextlib.contextmanager
def reading(files: Sequence[Path]) -> Iterator[None]:
    """Luigi reads ``files`` (already resolved, as :func:`loaded_files` lists them) inside; afterwards exactly what
    it held before, values set in this process included."""
    parser = luigi.configuration.get_config()
    before_paths = LuigiConfigParser._config_paths
    before = {section: {option: parser.get(section, option, raw=True) for option in parser.options(section)}
              for section in parser.sections()}

    def load(paths: list[str], values: dict[str, dict[str, str]] | None) -> None:
        for section in parser.sections():
            parser.remove_section(section)
        LuigiConfigParser._config_paths = paths
        if values is None:
            parser.read(paths)
        for section, options in (values or {}).items():
            parser.add_section(section)
            for option, value in options.items():
                parser.set(section, option, value)
        luigi.task_register.Register.clear_instance_cache()

    missing = [str(p) for p in files if not Path(p).is_file()]
    if missing:
        raise PresetError(f"{', '.join(missing)}: no such file (a configuration file the recorded run read)")
    load([str(p) for p in files], None)
    try:
        yield
    finally:
        load(before_paths, before)


def loaded_files() -> list[Path]:
    """The files Luigi reads now, in order."""
    return [Path(p) for p in LuigiConfigParser._config_paths if Path(p).is_file()]


def sources(files: Sequence[Path]) -> dict[tuple[str, str], Path]:
    """(section, option) -> the last of ``files`` that sets it: where each value in force comes from."""
    origin: dict[tuple[str, str], Path] = {}
    for path in files:
        parser = read_file(path)
        for section in parser.sections():
            origin.update({(section, option): path for option in parser.options(section)})
    return origin


def describe(path: Path) -> str:
    """A file as printed: relative to the project root when inside it."""
    return str(path.relative_to(PROJECT_ROOT)) if path.is_relative_to(PROJECT_ROOT) else str(path)


def effective(parser: configparser.ConfigParser | None = None,
              files: Sequence[Path] | None = None) -> dict[str, dict[str, tuple[object, str]]]:
    """Section -> option -> (value in force, where it comes from), for ``python -m pipeline config``.

    The value is the text Luigi reads (or the code default, from "default"); the source is the file that sets it
    (:func:`describe`). Every knob of stages/config.py comes first, then Luigi's own sections (``[preset]`` is
    left out: :func:`loaded_files` says what it did); an option of a stage section that is no knob is flagged,
    since Luigi ignores it silently.
    """
    from stages.config import all_knobs

    parser = luigi.configuration.get_config() if parser is None else parser
    origin = sources(loaded_files() if files is None else files)
    knobs = all_knobs()
    table: dict[str, dict[str, tuple[object, str]]] = {}
    for section in [*knobs, *(s for s in parser.sections() if s not in knobs and s != SECTION)]:
        defaults = knobs.get(section, {})
        read = parser.options(section) if parser.has_section(section) else []
        rows: dict[str, tuple[object, str]] = {}
        for name in [*defaults, *(o for o in read if o not in defaults)]:
            if not parser.has_option(section, name):
                rows[name] = (defaults[name], "default")
                continue
            where = describe(origin[section, name]) if (section, name) in origin else "set in this process"
            if section in knobs and name not in defaults:
                where += "; not a knob of this stage, ignored"
            rows[name] = (parser.get(section, name), where)
        table[section] = rows
    return table


def _message_only(hook: Callable) -> Callable:
    """``sys.excepthook`` printing a :class:`PresetError` as its message alone: it names the file and the problem,
    the traceback (through the import of ``pipeline``) adds nothing."""
    def show(kind: type, err: BaseException, tb: object) -> None:
        if isinstance(err, PresetError):
            print(f"error: {err}", file=sys.stderr)
        else:
            hook(kind, err, tb)
    return show


# Importing ``pipeline`` (``luigi --module pipeline``, ``python -m pipeline``) installs the chain before Luigi reads
# any parameter: pipeline/__init__.py imports this module first. A bad chain raises (importers can catch it); when
# nothing does, the program ends printing the message alone.
try:
    install()
except PresetError:
    sys.excepthook = _message_only(sys.excepthook)
    raise
