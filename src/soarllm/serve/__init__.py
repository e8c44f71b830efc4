"""soar serve: OpenAI- and TGI-compatible HTTP serving (build_app, run_server)."""
