"""Exceptions raised by the publisher.

Two kinds matter to a worker: the event itself is wrong (fix the code, retrying is useless)
or the broker could not take it (retry later). Both share one base so a caller can catch
everything from this library at once.
"""

from __future__ import annotations


class SwitchboardError(Exception):
    """Base class of every error this library raises."""


class PublishError(SwitchboardError):
    """Redis refused or could not run the publish (connection lost, script error).

    The original ``redis`` exception is chained as ``__cause__``. Nothing of a batch was
    published when this is raised for a script error; after a connection error the caller
    cannot know, so a retry may duplicate events (each duplicate gets its own seq).
    """


class InvalidEvent(SwitchboardError, ValueError):
    """The event is not valid against the protocol's schema; nothing was published."""
