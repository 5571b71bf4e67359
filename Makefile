# Two entry points for newcomers: `make run` (install + main job on the embedded data), `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test install bench reproduce clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) mnist_mil_main.py --quick

test: install
	$(PY) -m pytest -q tests

# Every published-protocol run, in this order; each skips the trials whose files are committed, so an
# interrupted run resumes where it stopped (days of compute on 2 CPU cores: see the README per experiment).
reproduce: install
	for n in 5 20 30 50 80 100 10; do $(PY) mnist_mil_main.py --bag_size $$n || exit 1; done
	$(PY) mnist_mil_main.py --bag_size 5 --precision fp32 --tag 5_fp32
	for k in 2 3 5; do $(PY) mnist_mil_main.py --k_mil $$k --precision fp32 || exit 1; done
	for d in fox tiger elephant ucsb musk1 musk2; do for m in sparse standard; do \
		$(PY) real_world_mil.py --dataset $$d --mode $$m || exit 1; done; done
	$(PY) hopfield_deq.py --full
	$(PY) mnist_mil_main.py --report
	$(PY) real_world_mil.py --report

bench: install
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) results/ray
