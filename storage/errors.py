"""The project's one exceptions module.

Every error a user can cause (a bad file, a bad model, a bad option) is a
``SegflowError`` whose message is one line naming the file and the problem, so
the CLI can print ``str(err)`` and a batch can record it and go on.  Bugs stay
ordinary exceptions.  ``storage`` is the base layer, so ``segmentation`` and
``flows`` import their error types from here.
"""

from __future__ import annotations

from os import PathLike


class SegflowError(Exception):
    """Base of every expected, user-facing failure."""

    def __init__(self, path: str | PathLike[str] | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = printable(" ".join(str(problem).split()))  # always one line
        shown = None if self.path is None else printable(self.path)
        super().__init__(self.problem if shown is None else f"{shown}: {self.problem}")

    def __reduce__(self) -> tuple:
        """Pickled whole (a Dask worker process sends its errors to the client, Prefect keeps a state's): the
        default rebuilt the error from its message alone and failed (``__init__`` takes a path and a problem)."""
        return _restore, (type(self), str(self), dict(self.__dict__))


def printable(text: str) -> str:
    """Control characters (a NUL in a band name, an escape sequence in a file name) as escapes (``\\x00``): a
    message quoting names read from inside files is printed on terminals and written into reports."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _restore(cls: type, text: str, state: dict) -> "SegflowError":
    err = cls.__new__(cls)
    Exception.__init__(err, text)
    err.__dict__.update(state)
    return err


class InputError(SegflowError):
    """An input file cannot be used (missing, unreadable, malformed, unsupported)."""


class UnsupportedFormatError(InputError):
    """The file is not a format segflow reads."""


class CorruptInputError(InputError):
    """The file claims a known format but its content cannot be read."""


class InvalidInputError(InputError):
    """The file reads, but its content cannot be segmented (dtype, NaN, geometry...)."""


class UnsafeInputError(InputError):
    """The file names a source GDAL must not open for it (:mod:`storage.sources`): outside the folders allowed,
    a special handler, a metadata address."""


class IncompatibleInputError(InputError):
    """The input does not fit the model (dimensionality, channel count)."""


class ModelError(SegflowError):
    """A model directory, card or weights file is unusable."""


class UnsafeModelError(ModelError):
    """A model file would execute code when loaded; it is refused."""


class StoreError(SegflowError):
    """A zarr store is missing, incomplete or not a segflow store."""


class ExportError(SegflowError):
    """An output could not be written (disk full, permission, bad target)."""


class ConfigError(SegflowError):
    """Parameters are invalid or inconsistent."""


class ProvenanceError(SegflowError):
    """Provenance is missing or does not match the files it describes."""


class LockLostError(SegflowError):
    """Another run took over an input while this one stalled (its lock broken for a silent heartbeat): this run
    writes none of its outputs, and its partial work, which the other run may be using, stays."""


class RunFailed(SegflowError):
    """A batch or nightly flow run that ended Failed, called without ``return_state``: raised by Prefect with the
    run's message; ``result`` holds what ``return_state=True`` gives (every outcome, or the run's report)."""

    def __init__(self, problem: str, result: object) -> None:
        super().__init__(None, problem)
        self.result = result


def error_names() -> set[str]:
    """The class names of SegflowError and every subclass defined so far (in log lines that name an error the
    run reports itself)."""
    names, todo = set(), [SegflowError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo += cls.__subclasses__()
    return names


def one_line(exc: BaseException, label: str | None = None) -> str:
    """An input's failure as the one line a batch reports: a SegflowError's own text (it names its file), else
    the input's ``label``, the type and the message."""
    if isinstance(exc, SegflowError):
        return str(exc)
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return f"{label}: {text}" if label else text


def is_native_panic(exc: BaseException) -> bool:
    """A Rust library's panic raised through pyo3 (``pyo3_runtime.PanicException``: pylibjpeg-rle on damaged RLE
    data panicked with 'index out of bounds').  It derives from BaseException, not Exception, so a batch's
    ``except Exception`` let it through and one bad file ended the whole batch (and a Prefect flow, as a crash)."""
    return not isinstance(exc, Exception) and type(exc).__name__ == "PanicException"
