"""The one exception a user sees from the data pipeline."""


class DataError(Exception):
    """A data problem the user can fix; the message is one line naming the file or recipe key."""
