"""The LLM side of epicrisis: talking to TGI / OpenAI-compatible servers, and a TGI simulator."""
