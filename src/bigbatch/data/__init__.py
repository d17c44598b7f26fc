"""Data path: sources -> tokenizer -> cached token arrays -> packed rows -> rank-aware loader."""
