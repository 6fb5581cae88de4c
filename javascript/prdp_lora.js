// A1111/Forge load every extensions/<name>/javascript/*.js. While a PRDP run holds the webui's queue lock, a
// generation started meanwhile sits "In queue"; this says what it waits for, next to the webui's own progress text.
(function() {
    const NOTICE = " - waiting for the PRDP LoRA training run to finish (PRDP LoRA tab)";
    let running = false;
    let checkedAt = 0;

    function queuedProgressTexts() {
        return Array.from(gradioApp().querySelectorAll(".progressDiv .progress"))
            .filter((el) => el.textContent.startsWith("In queue") && !el.textContent.endsWith(NOTICE));
    }

    onUiUpdate(function() {
        const waiting = queuedProgressTexts();
        if (!waiting.length) return;
        if (Date.now() - checkedAt > 2000) {  // the webui redraws its text every half second: ask now and then
            checkedAt = Date.now();
            fetch("./prdp-lora/status").then((r) => r.json()).then((status) => { running = status.running; });
        }
        if (running) waiting.forEach((el) => { el.textContent += NOTICE; });
    });
})();
