"""Code that talks to a hub and a broker from outside: what the CLI verbs and consumers use.

It never imports server internals.

- ``http``: the asyncio HTTP client of the hub's API.
- ``output``: tables, JSON and progress bars for the terminal.
- ``results``: a de-duplicating results subscriber with gap detection.
"""
