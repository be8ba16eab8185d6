"""Sections the dashboard's pages share or that would make a page too long: drawing only, no computation."""
