"""aigen: a self-hostable asynchronous AI generation API."""

__version__ = "0.1.0"
