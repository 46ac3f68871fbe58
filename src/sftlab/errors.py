"""The errors a user can act on, one family.

Every error sftlab raises for bad input or a bad setting derives from :class:`SftlabError`;
its message says what is wrong, where (file:line, config key, step) and what to do. The
`sftlab` command prints any of them as one clean line and exits with code 1 (a traceback only
with `sftlab --debug ...` or SFTLAB_DEBUG=1); any other exception is a bug and keeps its
traceback. Importing this module is cheap (no torch).

    SftlabError
    ├── ConfigError            sftlab.config          a run config key or value
    ├── DataError              sftlab.data.readers    a data file, row or field
    ├── TemplateError          sftlab.data.templates  a prompt template (and TemplateConsistencyError)
    ├── ModelNotFoundError     sftlab.models.registry a model name, folder or hub id
    ├── NonFiniteLossError     here                   a NaN/Inf loss or gradient (on_nan: error)
    ├── ResourceError          here                   out of memory, or no such device
    ├── QualityError           here                   a setting of quality / filter
    ├── EvalError              sftlab.eval.errors     an eval setting or input
    ├── SelfInstructError      sftlab.selfinstruct    seeds, backend or settings of self-instruct
    ├── ChatError              sftlab.infer.chat      a chat command or saved conversation
    └── APIError               sftlab.infer.server    an HTTP request to `sftlab serve` (its status code)
"""

from __future__ import annotations


class SftlabError(Exception):
    """A user-facing error: the message names what, where, and what to do."""


class NonFiniteLossError(SftlabError, RuntimeError):
    """A step's loss or gradient norm is NaN/Inf; the message names the step and its rows."""


class ResourceError(SftlabError, RuntimeError):
    """The machine cannot run the settings: out of memory, or a device that is not there."""


class QualityError(SftlabError, ValueError):
    """A setting of `sftlab quality` / `sftlab filter` out of its range."""
