"""Entry points; filled by later issues."""
