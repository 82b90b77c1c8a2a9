# Two commands for a newcomer: `make run` and `make test`.
# Both install what is missing (scripts/install-deps.sh), then build.

JOBS        ?= $(shell nproc 2>/dev/null || echo 2)
BUILD       ?= build
BUILD_ASAN  ?= build-asan
BUILD_FUZZ  ?= build-fuzz
FUZZ_SECONDS ?= 60
CONFIG      ?= examples/tollgate.yaml

.PHONY: all deps build build-asan run test unit bench fuzz clean

all: build

deps:
	@bash scripts/install-deps.sh

build: deps
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTG_SANITIZE=OFF >/dev/null
	@cmake --build $(BUILD) -j $(JOBS) --target tollgate tollgate-sim

build-asan: deps
	@cmake -S . -B $(BUILD_ASAN) -DCMAKE_BUILD_TYPE=Debug -DTG_SANITIZE=ON >/dev/null
	@cmake --build $(BUILD_ASAN) -j $(JOBS)

run: export TG_DEPS_NPM_OPTIONAL = 1
run: build
	@bash scripts/run-demo.sh $(BUILD) $(CONFIG)

test: build-asan
	@cd $(BUILD_ASAN) && ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  ctest --output-on-failure --timeout 1500 -j 2

unit: build-asan
	@cd $(BUILD_ASAN) && ctest --output-on-failure -R unit/

bench: build
	@bash bench/proxy.sh $(BUILD)

# The fuzz targets with clang's libFuzzer, each run FUZZ_SECONDS from its
# seed corpus (`make test` replays the seeds without clang).
fuzz: deps
	@command -v clang >/dev/null || { echo "make fuzz needs clang: apt-get install clang"; exit 1; }
	@CC=clang cmake -S . -B $(BUILD_FUZZ) -DCMAKE_BUILD_TYPE=Debug -DTG_SANITIZE=ON -DTG_FUZZ=ON >/dev/null
	@cmake --build $(BUILD_FUZZ) -j $(JOBS) --target fuzz_json fuzz_sse fuzz_key fuzz_http fuzz_upstream fuzz_spool
	@bash scripts/fuzz.sh $(BUILD_FUZZ) $(FUZZ_SECONDS)

clean:
	rm -rf $(BUILD) $(BUILD_ASAN) $(BUILD_FUZZ)
