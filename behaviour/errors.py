"""The behaviour backends' errors: each message is one line and names what was wrong.

A template or table error is bad input (a :class:`sim.archetypes.ArchetypeError`, so a command
line reports it as it reports a malformed table); a backend error is a failed run, and its
message starts with the endpoint (URL or model file) it concerns.
"""

from __future__ import annotations

from sim.archetypes import ArchetypeError


class TemplateError(ArchetypeError):
    """A prompt template names an unknown field, or one the grid lacks; the message names it."""


class BackendError(RuntimeError):
    """A language-model backend failed; the message names the endpoint and what went wrong."""


class BackendUnreachable(BackendError):
    """No connection to the endpoint could be made (after the retries)."""


class BackendTimeout(BackendError):
    """The endpoint did not answer within the timeout (after the retries)."""


class BackendHTTPError(BackendError):
    """The endpoint answered with an HTTP error status (5xx after the retries, or a 4xx)."""


class NonCompliantEndpoint(BackendError):
    """The endpoint does not speak the OpenAI-compatible chat-completions API."""


class MalformedAnswer(BackendError):
    """A chat completion whose choices cannot give p(Yes): no content, bad log-probabilities,
    or no Yes/No answer at all."""
