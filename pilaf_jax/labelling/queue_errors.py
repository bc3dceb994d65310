"""What the labelling queue refuses: each error names what is wrong, and its http_status is what the
labelling web server answers. Nothing was changed when one is raised."""
from __future__ import annotations


class QueueError(ValueError):
  """A refused queue operation; nothing was changed. http_status: what a web server answers."""
  http_status = 400


class UnknownLabeller(QueueError):
  http_status = 401  # Bad or missing token, or a name that was never added.


class UnknownQuery(QueueError):
  http_status = 404


class NotAssigned(QueueError):
  http_status = 403  # The query is not assigned to this labeller.


class AlreadyAnswered(QueueError):
  http_status = 409  # This labeller answered it already (a replay).


class QueryResolved(QueueError):
  http_status = 409  # Enough answers are in already.


class BadChoice(QueueError):
  http_status = 400  # Not in CHOICES, or 'tie' while ties are off.


class QueueSettingsMismatch(QueueError):
  """The file's queue was created with other answers_per_query / allow_ties."""
  http_status = 500
