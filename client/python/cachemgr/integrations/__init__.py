"""Integrations of the cachemgr client with serving engines (vllm: the v1 KV connector)."""
