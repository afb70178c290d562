"""occrt: LLM compression in operator coordinates, and a light runtime for the .occ container."""
__version__ = "0.1.0"
