"""The distributed machinery, independent of any one model: communication, process groups, parallel layers."""
