"""Integrations that swap lightmotion_fast's ops into other libraries' models."""
