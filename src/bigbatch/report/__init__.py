"""Run reports (`bigbatch report`) and compare pages (`bigbatch compare`)."""
