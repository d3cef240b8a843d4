"""The LLM proxies' side of the budgets: their configuration as the catalog implies it.

Pure: catalogs and options in, configuration mappings and drift lines out. No file,
no API server (the ``tokenbudget gateway`` command in :mod:`token_budget.cli`
reads and writes them). One module a proxy: :mod:`.litellm`.
"""
