"""The explanation query language: grammar (lark), parser, AST, binder.

Imports nothing internal to krypton_db (imports point one way: ``krypton_db.query`` drives
this package, resolving names against the catalog through the binder's callbacks).
"""

from . import ast
from .binder import OPTIONS, SESSION_OPTIONS, BoundQuery, bind_call, check_option
from .errors import DslBindError, DslError, DslSyntaxError
from .parser import parse, parse_call
from .scanner import is_complete, split

__all__ = ["OPTIONS", "SESSION_OPTIONS", "BoundQuery", "DslBindError", "DslError",
           "DslSyntaxError", "ast", "bind_call", "check_option", "is_complete", "parse",
           "parse_call", "split"]
