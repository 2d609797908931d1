@echo off
rem imsrc set-up for Windows: an interactive menu, or one subcommand for scripts.
rem A line-by-line translation of setup.sh (it cannot be run where imsrc is developed; see README).
rem   setup.bat install | db | populate [N] [DATASET] | index | serve | test [ARGS] | evaluate [N] | demo | status
setlocal EnableDelayedExpansion
cd /d "%~dp0"
set "PY=.venv\Scripts\python.exe"

if "%~1"=="" goto menu
set "CMD=%~1"
shift
if /i "%CMD%"=="install" goto install
if /i "%CMD%"=="db" goto db
if /i "%CMD%"=="populate" goto populate
if /i "%CMD%"=="index" goto index
if /i "%CMD%"=="serve" goto serve
if /i "%CMD%"=="test" goto test
if /i "%CMD%"=="evaluate" goto evaluate
if /i "%CMD%"=="demo" goto demo
if /i "%CMD%"=="status" goto status
echo unknown command: %CMD% (install, db, populate, index, serve, test, evaluate, demo, status) 1>&2
exit /b 2

:menu
rem Each step runs through :step, so its failure (or Ctrl-C) is reported in one line and the menu comes back.
rem cmd.exe asks "Terminate batch job (Y/N)?" after a Ctrl-C: answer N to come back to the menu.
echo.
set "STATE=not installed yet: choose 1"
if exist "%PY%" (
  set "STATE=status unavailable: choose 8 to see why"
  for /f "usebackq delims=" %%L in (`%PY% -m backend status --line 2^>nul`) do set "STATE=%%L"
)
echo imsrc set-up  !STATE!
echo   1) Install dependencies
echo   2) Set up the database
echo   3) Populate: add images (CIFAR-10, Fashion-MNIST, a folder or a CSV)
echo   4) Initialise the vector search (prototypes and index)
echo   5) Start the server (Ctrl-C stops it and comes back here)
echo   6) Run the tests
echo   7) Evaluate two-stage against exhaustive search
echo   8) Show status
echo   q) Quit
set "CHOICE="
rem cmd cannot tell an empty answer from the end of input: both leave the menu, as end of input does in setup.sh.
set /p "CHOICE=Choose: "
if not defined CHOICE exit /b 0
if "!CHOICE!"=="1" call :step "see the pip output above; check the network to the package registries, then choose 1 again" :do_install & goto menu
if "!CHOICE!"=="2" call :step "see the error above: check DATABASE_URL (or unset it for the embedded server), then choose 2 again" :do_run init-db & goto menu
if "!CHOICE!"=="3" call :step "see the error above, then choose 3 again and pick a dataset that is available here" :do_run populate --interactive & goto menu
if "!CHOICE!"=="4" call :step "see the error above; populate first (3) if there are no vectors yet" :do_run rebuild & goto menu
if "!CHOICE!"=="5" call :step "see the error above (8 shows what the database holds)" :do_run serve & goto menu
if "!CHOICE!"=="6" call :step "see the failing tests above" :do_test & goto menu
if "!CHOICE!"=="7" call :step "see the error above; evaluation needs a populated Fashion-MNIST or CIFAR-10 collection (3)" :do_evaluate 1000 & goto menu
if "!CHOICE!"=="8" call :step "see the error above: check DATABASE_URL, or choose 2 to set up the database" :do_run status & goto menu
if /i "!CHOICE!"=="q" exit /b 0
echo unknown choice: !CHOICE! (type 1-8, or q to quit)
goto menu

:step
rem %1: what to do next if the step fails; the rest: the step's label and arguments.
set "HINT=%~1"
call %2 %3 %4 %5 %6 %7 %8 %9
set "RC=!errorlevel!"
if "!RC!"=="0" exit /b 0
if "!RC!"=="130" (echo ==^> stopped ^(Ctrl-C^)) else if "!RC!"=="-1073741510" (echo ==^> stopped ^(Ctrl-C^)) else (echo ==^> failed ^(exit !RC!^): !HINT!)
exit /b 0

:install
call :do_install
exit /b %errorlevel%

:db
call :do_run init-db
exit /b %errorlevel%

:populate
rem In a console, populate asks for what is not given; N defaults to 1000 for scripts, as in setup.sh.
set "N=%~1"
set "DS=%~2"
set "ARGS=--interactive"
if not "%DS%"=="" set "ARGS=!ARGS! --dataset %DS%"
if not "%N%"=="" set "ARGS=!ARGS! --num-images %N%"
call :do_run populate !ARGS!
exit /b %errorlevel%

:index
call :do_run rebuild
exit /b %errorlevel%

:serve
call :do_run serve
exit /b %errorlevel%

:status
call :do_run status
exit /b %errorlevel%

:evaluate
call :do_evaluate %1
exit /b %errorlevel%

:test
call :do_test %1 %2 %3 %4 %5 %6 %7 %8 %9
exit /b %errorlevel%

:demo
call :do_install || exit /b 1
rem Fashion-MNIST ships in a Debian package, not on Windows: offline, point FASHION_MNIST_DIR at its IDX files.
powershell -NoProfile -Command "try { (New-Object Net.Sockets.TcpClient).Connect('huggingface.co', 443); exit 0 } catch { exit 1 }"
if errorlevel 1 (
  echo no network: using the offline model efficientnet_lite0 and Fashion-MNIST from FASHION_MNIST_DIR
  set "MODEL_NAME=efficientnet_lite0"
  if "%DEMO_IMAGES%"=="" set "DEMO_IMAGES=2000"
  call :do_run populate --dataset fashion-mnist --num-images !DEMO_IMAGES! || exit /b 1
) else (
  if "%MODEL_NAME%"=="" set "MODEL_NAME=resnet50"
  if "%DEMO_IMAGES%"=="" set "DEMO_IMAGES=1000"
  call :do_run populate --dataset cifar10 --num-images !DEMO_IMAGES! || exit /b 1
)
call :do_run serve
exit /b %errorlevel%

:do_install
if not exist "%PY%" (
  echo ==^> creating .venv
  python -m venv .venv || (echo imsrc needs Python 3.10 or newer on PATH & exit /b 1)
)
echo ==^> installing Python packages (torch is large: a few minutes the first time)
"%PY%" -m pip install -q --upgrade pip
"%PY%" -m pip install -q -r requirements-dev.txt || exit /b 1
if not exist .env copy .env.example .env >nul
exit /b 0

:do_evaluate
set "N=%~1"
if "%N%"=="" set "N=1000"
if not exist data mkdir data
call :do_run evaluate --queries %N% --json data\evaluation.json
exit /b %errorlevel%

:do_test
if not exist "%PY%" call :do_install || exit /b 1
if "%TEST_WORKERS%"=="" set "TEST_WORKERS=2"
if %TEST_WORKERS% GTR 1 (
  "%PY%" -m pytest -n %TEST_WORKERS% --dist loadgroup %*
) else (
  "%PY%" -m pytest %*
)
exit /b %errorlevel%

:do_run
if not exist "%PY%" call :do_install || exit /b 1
"%PY%" -m backend %*
exit /b %errorlevel%
