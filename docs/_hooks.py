"""mkdocs hooks for the jadam site (listed under ``hooks:`` in mkdocs.yml).

jadam's docstrings title their doctests ``Example:`` (singular, as optax
does). griffe's Google-style parser recognises only ``Examples:`` as an
examples section and renders anything else as an admonition of Markdown
text, where ``>>>`` becomes a block quote and printed lists look like link
references. Registering the singular title as an alias makes those sections
render as code. If a future griffe moves its table, the site still builds;
the examples then render as plain text again.
"""

try:
  from griffe import DocstringSectionKind
  from griffe._internal.docstrings import google as _google
  _google._section_kind.setdefault("example", DocstringSectionKind.examples)
except (ImportError, AttributeError):  # pragma: no cover
  pass


import re

# The docstrings cross-reference with Sphinx roles (:func:`adam`); Markdown
# renders the backquoted name as code and leaves the role as literal text.
_SPHINX_ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|obj):(?=<code>)")


def on_page_content(html, **kwargs):
  """Drop the literal Sphinx role in front of each rendered ``<code>`` name."""
  del kwargs
  return _SPHINX_ROLE.sub("", html)
