"""The wire contract shared by controller, edge agents and operators.

Topics, message models, the signed artifact manifest and typed settings. This
package imports nothing else of the project's, and does no network I/O.
"""

SCHEMA_VERSION = 1
__version__ = "0.1.0"
