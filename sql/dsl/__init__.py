"""The explanation query language: grammar (lark), parser, AST, binder.

Of krypton_db it imports only the shared option checks (``krypton_db.options``, which the
Python API uses too) and the error base class (imports point one way: ``krypton_db.query``
drives this package, resolving names against the catalog through the binder's callbacks).
"""

from . import ast
from .binder import OPTIONS, SESSION_OPTIONS, BoundQuery, bind_call, check_option
from .errors import DslBindError, DslError, DslSyntaxError
from .parser import parse, parse_call
from .scanner import is_complete, split

__all__ = ["OPTIONS", "SESSION_OPTIONS", "BoundQuery", "DslBindError", "DslError",
           "DslSyntaxError", "ast", "bind_call", "check_option", "is_complete", "parse",
           "parse_call", "split"]
