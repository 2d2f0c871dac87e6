"""Helpers every part of marlin may import (and which import nothing of marlin's above them): atomic files, seeding,
process groups, job pools, precision, optimiser groups, schedules and run monitoring."""
